"""QGIS styles (QML) for geoseg's outputs: class names and card colours, applied on open.

QGIS reads two kinds of default style without any user action:

- a ``layer_styles`` table inside a GeoPackage, row with ``useAsDefault`` true for the layer
  (written by :mod:`geoseg.io.vectors`), and
- a ``<basename>.qml`` file beside a file-based layer (``mask.qml`` beside ``mask.tif``,
  ``polygons.qml`` beside ``polygons.fgb`` / ``polygons.parquet``).

Both hold the same QML document: a ``categorizedSymbol`` renderer on ``class_id`` for polygons, a
``paletted`` renderer on band 1 for the class raster. The XML is the subset of what QGIS 3.x itself
writes for these renderers (``QgsMapLayer::saveNamedStyle``); older and newer QGIS read it alike.
Pure: returns strings, opens nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

from geoseg.models.card import ClassInfo

__all__ = ["OUTLINE", "categorized_polygons_qml", "paletted_raster_qml"]

# Dark outline so that neighbouring polygons of one colour stay distinguishable.
OUTLINE = (35, 35, 35)
_HEADER = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
# The oldest QGIS these documents were written against (Debian 12's); newer ones read them too.
_VERSION = "3.22.0"


def _rgba(color: Sequence[int], alpha: int = 255) -> str:
    return f"{color[0]},{color[1]},{color[2]},{alpha}"


def _fill_symbol(name: int, color: Sequence[int]) -> str:
    props = {
        "color": _rgba(color),
        "outline_color": _rgba(OUTLINE),
        "outline_style": "solid",
        "outline_width": "0.26",
        "outline_width_unit": "MM",
        "style": "solid",
        "joinstyle": "bevel",
    }
    # QGIS >= 3.26 reads the Option map, older versions the prop list; both are written (as QGIS
    # 3.22 does itself).
    options = "".join(f'<Option name="{k}" type="QString" value="{v}"/>' for k, v in props.items())
    legacy = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (
        f'      <symbol name="{name}" type="fill" alpha="1" clip_to_extent="1" force_rhr="0">\n'
        '        <layer class="SimpleFill" enabled="1" pass="0" locked="0">\n'
        f'          <Option type="Map">{options}</Option>\n'
        f"          {legacy}\n"
        "        </layer>\n"
        "      </symbol>\n"
    )


def categorized_polygons_qml(classes: Sequence[ClassInfo], attribute: str = "class_id") -> str:
    """A vector style: one category per class on ``attribute``, labelled and filled per card.

    Args:
        classes: Classes in legend order (id, name, RGB colour).
        attribute: The field holding the class id.

    Returns:
        The QML document.
    """
    categories = "".join(
        f"      <category value={quoteattr(str(c.id))} label={quoteattr(c.name)} "
        f'symbol="{i}" render="true"/>\n'
        for i, c in enumerate(classes)
    )
    symbols = "".join(_fill_symbol(i, c.color) for i, c in enumerate(classes))
    return (
        f"{_HEADER}"
        f'<qgis version="{_VERSION}" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(attribute)} '
        'symbollevels="0" enableorderby="0" forceraster="0" referencescale="-1">\n'
        "    <categories>\n"
        f"{categories}"
        "    </categories>\n"
        "    <symbols>\n"
        f"{symbols}"
        "    </symbols>\n"
        "  </renderer-v2>\n"
        "  <blendMode>0</blendMode>\n"
        "  <featureBlendMode>0</featureBlendMode>\n"
        "  <layerOpacity>1</layerOpacity>\n"
        "</qgis>\n"
    )


def paletted_raster_qml(classes: Sequence[ClassInfo], band: int = 1) -> str:
    """A raster style: the paletted renderer with one entry per class (name as label).

    Values without an entry (nodata among them) are not drawn.

    Args:
        classes: Classes (id, name, RGB colour).
        band: The class band.

    Returns:
        The QML document.
    """
    entries = "".join(
        f'        <paletteEntry value="{c.id}" color="#{c.color[0]:02x}{c.color[1]:02x}'
        f'{c.color[2]:02x}" alpha="255" label={quoteattr(c.name)}/>\n'
        for c in classes
    )
    return (
        f"{_HEADER}"
        f'<qgis version="{_VERSION}" styleCategories="Symbology">\n'
        "  <pipe>\n"
        f'    <rasterrenderer type="paletted" band="{band}" opacity="1" alphaBand="-1" '
        'nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <colorPalette>\n"
        f"{entries}"
        "      </colorPalette>\n"
        "    </rasterrenderer>\n"
        '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" invertColors="0"/>\n'
        '    <rasterresampler maxOversampling="2"/>\n'
        "  </pipe>\n"
        "  <blendMode>0</blendMode>\n"
        "</qgis>\n"
    )

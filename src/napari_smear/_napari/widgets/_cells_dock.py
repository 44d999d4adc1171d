"""The base of the docks that follow one cells layer (Differential count, Cell gallery).

Each keeps a "cells layer" combo box in step with the viewer's layers (added, removed,
renamed), watches the chosen layer's events, and redraws itself (``refresh``) when the
layer changes. When the dock is closed its Qt object goes; it then stops listening to
the viewer and the layer, whose callbacks would reach a deleted widget.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from napari.layers import Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QWidget

from napari_smear._napari.layers import METADATA_KEY

if TYPE_CHECKING:
    import napari

__all__ = ["CellsLayerDock"]


class CellsLayerDock(QWidget):
    """A dock widget showing something of one cells layer of the viewer.

    Subclasses build their widgets (``self._layer_combo`` is made here), then call
    :meth:`_follow_layers` last in ``__init__``; they implement :meth:`refresh` and may
    override :meth:`_layer_watched` / :meth:`_layer_unwatched` to connect to (and
    disconnect from) the layer's events and reset what they keep about a layer.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, combo_tooltip: str):
        super().__init__()
        self._viewer = napari_viewer
        self._layer: Labels | None = None
        self._layer_combo = QComboBox()
        self._layer_combo.setToolTip(combo_tooltip)
        # a layer's features and colormap change together (reclassified, a class set by
        # hand): one redraw for both, when the event loop comes round (_schedule_refresh)
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(0)
        self._refresh_timer.timeout.connect(self.refresh)

    def _follow_layers(self) -> None:
        self._layer_combo.currentIndexChanged.connect(self._on_layer_combo_changed)
        viewer_events = (
            self._viewer.layers.events.inserted,
            self._viewer.layers.events.removed,
            self._viewer.layers.events.renamed,
        )
        for event in viewer_events:
            event.connect(self._fill_layer_combo)
        self.destroyed.connect(lambda *_, w=self, e=viewer_events: _stop_following(w, e))
        self._fill_layer_combo()
        if self._layer is None:
            self.refresh()

    # ------------------------------------------------------------------ public API
    @property
    def layer(self) -> Labels | None:
        """The cells layer shown."""
        return self._layer

    def set_layer(self, layer: Labels) -> None:
        """Show ``layer`` (a cells layer in the viewer)."""
        self._fill_layer_combo()
        index = self._layer_combo.findText(layer.name)
        if index < 0:
            raise ValueError(f"{layer.name!r} is not a cells labels layer of this viewer")
        if index == self._layer_combo.currentIndex():
            self._watch(layer)
        else:
            self._layer_combo.setCurrentIndex(index)

    def refresh(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    # ------------------------------------------------------------------ for subclasses
    def _layer_row(self) -> QHBoxLayout:
        """The "cells layer" label and combo box, as a row of the dock's layout."""
        row = QHBoxLayout()
        row.addWidget(QLabel("cells layer"))
        row.addWidget(self._layer_combo, 1)
        return row

    def _schedule_refresh(self, *_: Any) -> None:
        self._refresh_timer.start()

    def _layer_watched(self, layer: Labels | None) -> None:
        """The dock now shows ``layer`` (None: no layer); called before :meth:`refresh`."""

    def _layer_unwatched(self, layer: Labels) -> None:
        """The dock no longer shows ``layer`` (or is closing)."""

    def _closing(self) -> None:
        """The dock is closing: let go of anything else it listens to."""

    # ------------------------------------------------------------------ internals
    def _cells_layers(self) -> list[Labels]:
        return [
            layer for layer in self._viewer.layers
            if isinstance(layer, Labels) and "cell_type" in getattr(layer, "features", pd.DataFrame()).columns
            and layer.metadata.get(METADATA_KEY, {}).get("kind", "cells") == "cells"
        ]

    def _fill_layer_combo(self, *_: Any) -> None:
        current = self._layer.name if self._layer is not None else None
        names = [layer.name for layer in self._cells_layers()]
        self._layer_combo.blockSignals(True)
        self._layer_combo.clear()
        self._layer_combo.addItems(names)
        if current in names:
            self._layer_combo.setCurrentIndex(names.index(current))
        self._layer_combo.blockSignals(False)
        chosen = self._layer_combo.currentText()
        layer = self._viewer.layers[chosen] if chosen else None
        if not _same_layer(layer, self._layer):
            self._watch(layer)

    def _on_layer_combo_changed(self, index: int) -> None:
        name = self._layer_combo.itemText(index) if index >= 0 else ""
        self._watch(self._viewer.layers[name] if name in self._viewer.layers else None)

    def _watch(self, layer: Labels | None) -> None:
        if self._layer is not None:
            self._layer_unwatched(self._layer)
        self._layer = layer
        self._layer_watched(layer)
        self.refresh()


def _same_layer(a: Any, b: Any) -> bool:
    # npe2 hands widgets a proxy of the viewer whose layers are proxies too: compare ids.
    if a is None or b is None:
        return a is b
    return a.unique_id == b.unique_id


def _stop_following(widget: CellsLayerDock, viewer_events: tuple) -> None:
    for event in viewer_events:
        event.disconnect(widget._fill_layer_combo)
    if widget._layer is not None:
        widget._layer_unwatched(widget._layer)
    widget._layer = None
    widget._closing()

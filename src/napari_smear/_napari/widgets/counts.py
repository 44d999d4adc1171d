"""The "Differential count" dock widget: per-class counts of a classified cells layer.

It reads the ``cell_type`` and ``class`` columns of a cells layer's features (what the
"Classify cells" widget or :func:`napari_smear.add_to_viewer` put there, or what the
user typed into napari's features table) and shows
:func:`napari_smear.pipeline.differential_counts` as a table and a bar plot, exportable
to CSV. It also names the class and confidence of the selected cell.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from napari.layers import Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_smear._napari.layers import (
    CELL_TYPE_COLORS,
    METADATA_KEY,
    UNCLASSIFIED_ALPHA,
    UNKNOWN_COLOR,
    class_palette,
    nuclei_layer_of,
    recolor_by_class,
    refresh_cells_layer,
)
from napari_smear._napari.widgets._cells_dock import CellsLayerDock

if TYPE_CHECKING:
    import napari

__all__ = ["CountsWidget", "show_counts", "counts_from_features", "WIDGET_NAME"]

#: The widget's display name in the manifest (the dock's title).
WIDGET_NAME = "Differential count"
UNCLASSIFIED = "unclassified"
#: Cells layers up to this many pixels are measured again as soon as they are painted
#: or erased by hand (a pass over every pixel: about 20 ms on a camera field, a few
#: tenths of a second at this size, on the GUI thread); larger ones when Update is
#: pressed.
AUTO_REMEASURE_MAX_PIXELS = 16_000_000


def counts_from_features(features: pd.DataFrame, *, include_edge_cells: bool = True) -> pd.DataFrame:
    """Differential count of a cells layer's features.

    Cells whose ``class`` is empty or missing count as ``"unclassified"``; without a
    ``class`` column every cell is unclassified (a count of cell types). With
    ``include_edge_cells=False`` the cells cut by the image edge (``touches_edge``) are
    left out.

    Returns
    -------
    pandas.DataFrame
        ``cell_type, class, count, percent`` (percent of the cells of that type), as
        :func:`napari_smear.pipeline.differential_counts` gives it.
    """
    from napari_smear.pipeline import differential_counts

    if "cell_type" not in features.columns:
        raise ValueError(
            f"the layer's features have no 'cell_type' column (columns: {list(features.columns)}); "
            "choose a cells layer made by napari-smear"
        )
    table = pd.DataFrame({"cell_type": features["cell_type"].to_numpy()})
    if "class" in features.columns:
        table["class"] = [c if isinstance(c, str) and c else None for c in features["class"]]
    if "touches_edge" in features.columns:
        table["touches_edge"] = features["touches_edge"].to_numpy()
    return differential_counts(table, include_edge_cells=include_edge_cells)


def import_chart_modules() -> None:
    """Import what the counts chart needs (matplotlib: about half a second the first
    time). Called from a worker thread before the first result, so the viewer does not
    freeze while the chart's dock opens; importing defines classes and draws nothing."""
    import matplotlib.backends.backend_qtagg  # noqa: F401
    import matplotlib.figure  # noqa: F401


class CountsWidget(CellsLayerDock):
    """Dock widget: the differential count of a cells layer, as a table and a bar plot.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(
            napari_viewer, combo_tooltip="The cells labels layer to count (made by Segment / Classify cells)"
        )
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self._counts = pd.DataFrame(columns=["cell_type", "class", "count", "percent"])
        self._edge_checkbox = QCheckBox("Leave out cells cut by the image edge")
        self._edge_checkbox.setToolTip(
            "Count only whole cells: the classifier saw part of a cell the edge cuts, and where "
            "fields overlap the next field shows it whole"
        )
        self._all_checkbox = QCheckBox("Add up every cells layer (one differential over several fields)")
        self._all_checkbox.setToolTip(
            "A differential counts 100 or more white cells, more than one camera field holds: with several "
            "fields open (each segmented or classified), count all their cells layers together"
        )
        self._others: list[Labels] = []  # the other cells layers added up, while the box is ticked
        self._summary = QLabel("")
        self._summary.setWordWrap(True)
        self._table = QTableWidget(0, 4)
        self._table.setHorizontalHeaderLabels(["cell type", "class", "count", "%"])
        self._table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self._table.verticalHeader().setVisible(False)
        self._table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self._figure = Figure(figsize=(4, 3), layout="constrained")
        self._canvas = FigureCanvasQTAgg(self._figure)
        self._canvas.setMinimumHeight(180)
        self._canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self._refresh_button = QPushButton("Update")
        self._refresh_button.setToolTip(
            "Measure cells painted or erased by hand, count again and recolour the cells, "
            "e.g. after editing 'class' in the features table"
        )
        self._export_button = QPushButton("Export CSV…")
        self._selected = QLabel("")
        self._selected.setWordWrap(True)

        row = self._layer_row()
        buttons = QHBoxLayout()
        buttons.addWidget(self._refresh_button)
        buttons.addWidget(self._export_button)
        # The table and the plot scroll: with many classes they are taller than a
        # laptop screen, and beside other docks they pushed the buttons (and napari's
        # status bar) off it. The layer choice and the buttons stay in view.
        body = QWidget()
        body_layout = QVBoxLayout(body)
        body_layout.setContentsMargins(0, 0, 0, 0)
        body_layout.addWidget(self._summary)
        body_layout.addWidget(self._table, 1)
        body_layout.addWidget(self._canvas, 1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(body)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self._edge_checkbox)
        layout.addWidget(self._all_checkbox)
        layout.addWidget(scroll, 1)
        layout.addLayout(buttons)
        layout.addWidget(self._selected)

        # Brush strokes come one after another: measure once they pause.
        self._edit_timer = QTimer(self)
        self._edit_timer.setSingleShot(True)
        self._edit_timer.setInterval(400)
        self._edit_timer.timeout.connect(self._on_edits_settled)
        self._edited_by_hand = False  # painted since last measured (large layers)
        self._last_edit: dict[str, int] | None = None

        self._refresh_button.clicked.connect(self._on_update_clicked)
        self._edge_checkbox.toggled.connect(lambda *_: self.refresh())
        self._all_checkbox.toggled.connect(self._on_add_up_toggled)
        self._export_button.clicked.connect(self._on_export_clicked)
        self._follow_layers()

    # ------------------------------------------------------------------ public API
    @property
    def counts(self) -> pd.DataFrame:
        """The differential count shown (``cell_type, class, count, percent``)."""
        return self._counts.copy()

    @property
    def include_edge_cells(self) -> bool:
        """Whether the cells cut by the image edge are counted (the checkbox unticked)."""
        return not self._edge_checkbox.isChecked()

    @include_edge_cells.setter
    def include_edge_cells(self, value: bool) -> None:
        self._edge_checkbox.setChecked(not value)  # toggled -> refresh

    @property
    def add_up_layers(self) -> bool:
        """Whether every cells layer of the viewer is counted together (the box ticked)."""
        return self._all_checkbox.isChecked()

    @add_up_layers.setter
    def add_up_layers(self, value: bool) -> None:
        self._all_checkbox.setChecked(bool(value))  # toggled -> refresh

    @property
    def counted_layers(self) -> list[str]:
        """Names of the cells layers counted (the chosen one first)."""
        return [layer.name for layer in ([self._layer] if self._layer is not None else []) + self._others]

    @property
    def selected_text(self) -> str:
        """What the widget says about the selected cell."""
        return self._selected.text()

    def refresh(self) -> None:
        """Count the layer's cells again and redraw the table and the plot."""
        layer = self._layer
        if layer is None:
            self._counts = self._counts.iloc[0:0]
            self._summary.setText("No cells layer: run Segment cells or Classify cells first.")
        else:
            layers = [layer, *self._others]
            # only the columns counted: the layers' other columns (models, morphology) differ
            wanted = ("cell_type", "class", "touches_edge")
            features = pd.concat(
                [pd.DataFrame(each.features)[[c for c in wanted if c in each.features.columns]] for each in layers],
                ignore_index=True,
            )
            try:
                self._counts = counts_from_features(features, include_edge_cells=self.include_edge_cells)
            except ValueError as exc:
                self._counts = self._counts.iloc[0:0]
                self._summary.setText(str(exc))
            else:
                from napari_smear.pipeline import cut_by_edge

                left_out = 0 if self.include_edge_cells else int(cut_by_edge(features).sum())
                what = layer.name if not self._others else f"{len(layers)} cells layers added up"
                self._summary.setText(
                    _summary(self._counts, what, left_out)
                    + _edit_note(self._last_edit, self._edited_by_hand and layer.data.size > AUTO_REMEASURE_MAX_PIXELS)
                )
        self._fill_table()
        self._draw()
        self._on_selected_label()

    def export_csv(self, path: str | os.PathLike) -> Path:
        """Write the differential count to a CSV file (atomically); returns the path."""
        from napari_smear.io import write_csv_atomic

        if self._layer is None:
            raise ValueError("no cells layer to count")
        return write_csv_atomic(path, self.counts)

    # ------------------------------------------------------------------ internals
    def _on_add_up_toggled(self, *_: Any) -> None:
        self._sync_others()
        self.refresh()

    def _fill_layer_combo(self, *args: Any) -> None:
        super()._fill_layer_combo(*args)
        if self._all_checkbox.isChecked():  # a field opened or closed: count what is there now
            before = [id(layer) for layer in self._others]
            self._sync_others()
            if [id(layer) for layer in self._others] != before:
                self._schedule_refresh()

    def _sync_others(self) -> None:
        """Listen to the other cells layers while they are added up, and only then."""
        self._release_others()
        if self._all_checkbox.isChecked():
            chosen = self._layer.unique_id if self._layer is not None else None
            self._others = [layer for layer in self._cells_layers() if layer.unique_id != chosen]
            for layer in self._others:
                for event in (layer.events.features, layer.events.colormap, layer.events.data):
                    event.connect(self._schedule_refresh)

    def _release_others(self) -> None:
        for layer in self._others:
            for event in (layer.events.features, layer.events.colormap, layer.events.data):
                event.disconnect(self._schedule_refresh)
        self._others = []

    def _closing(self) -> None:
        self._release_others()  # (the Qt widgets are gone: only the layers' events here)

    def _layer_watched(self, layer: Labels | None) -> None:
        self._edited_by_hand = False
        self._last_edit = None
        self._sync_others()  # the chosen layer is not among the others
        if layer is not None:
            for event in (layer.events.features, layer.events.colormap):
                event.connect(self._schedule_refresh)
            layer.events.selected_label.connect(self._on_selected_label)
            layer.events.paint.connect(self._on_painted)
            layer.events.data.connect(self._on_data_replaced)

    def _layer_unwatched(self, layer: Labels) -> None:
        for event in (layer.events.features, layer.events.colormap):
            event.disconnect(self._schedule_refresh)
        layer.events.selected_label.disconnect(self._on_selected_label)
        layer.events.paint.disconnect(self._on_painted)
        layer.events.data.disconnect(self._on_data_replaced)

    def _on_data_replaced(self, *_: Any) -> None:
        # segmented again: the notes about earlier hand edits no longer apply
        self._edit_timer.stop()
        self._edited_by_hand = False
        self._last_edit = None
        self._schedule_refresh()

    def _on_painted(self, *_: Any) -> None:
        self._edited_by_hand = True
        self._edit_timer.start()

    def _on_edits_settled(self) -> None:
        layer = self._layer
        if layer is None:
            return
        if layer.data.size <= AUTO_REMEASURE_MAX_PIXELS:
            self.remeasure()
        else:
            self.refresh()  # the summary says to press Update

    def remeasure(self) -> dict[str, int] | None:
        """Measure the cells layer again after hand edits (see
        :func:`napari_smear._napari.layers.refresh_cells_layer`) and count it; returns
        what changed (None: nothing, or the layer was not made by a segmentation)."""
        layer = self._layer
        self._edited_by_hand = False
        if layer is None:
            return None
        try:
            edited = refresh_cells_layer(layer, nuclei_layer_of(self._viewer, layer))
        except ValueError:  # not a segmentation's layer (no table metadata): count the features
            edited = None
        if edited:
            self._last_edit = edited
        self.refresh()
        return edited

    def _on_update_clicked(self) -> None:
        self._edit_timer.stop()
        if self.remeasure() is None and self._layer is not None and "class" in self._layer.features.columns:
            recolor_by_class(self._layer)  # edited classes get their colours
            self.refresh()

    def _on_export_clicked(self) -> None:
        if self._layer is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the differential count", f"{self._layer.name} counts.csv", "CSV files (*.csv)"
        )
        if not path:
            return
        from napari.utils.notifications import show_error, show_info

        try:
            written = self.export_csv(path)
        except (OSError, ValueError) as exc:  # a folder gone, no permission, the file open elsewhere
            show_error(f"napari-smear: the differential count was not saved: {exc}")
        else:
            show_info(f"napari-smear: differential count saved to {written}")

    def _on_selected_label(self, *_: Any) -> None:
        layer = self._layer
        if layer is None:
            self._selected.setText("")
            return
        label = int(layer.selected_label)
        features = layer.features
        rows = features.index[features["index"] == label] if "index" in features.columns else []
        if label == 0 or not len(rows):
            self._selected.setText("Selected cell: none (pick a cell with the labels layer's picker)")
            return
        row = features.loc[rows[0]]
        text = f"Selected cell {label} ({row.get('cell_type', '?')})"
        cls = row.get("class")
        if isinstance(cls, str) and cls:
            confidence = row.get("confidence")
            text += f": {cls}"
            if confidence is not None and np.isfinite(confidence):
                text += f", confidence {float(confidence):.2f}"
        else:
            text += ": not classified"
        self._selected.setText(text)

    def _fill_table(self) -> None:
        counts = self._counts
        self._table.setRowCount(len(counts))
        for i, row in enumerate(counts.itertuples(index=False)):
            values = (row.cell_type, row[1], f"{int(row.count)}", f"{float(row.percent):.1f}")
            for j, value in enumerate(values):
                self._table.setItem(i, j, QTableWidgetItem(str(value)))
        # Show up to 8 rows without scrolling (the plot takes the rest of the dock).
        rows = min(max(len(counts), 2), 8)
        header = self._table.horizontalHeader().sizeHint().height()
        self._table.setMinimumHeight(header + rows * self._table.verticalHeader().defaultSectionSize() + 4)

    def _palette(self) -> dict[str, tuple]:
        stored = {}
        if self._layer is not None:
            stored = self._layer.metadata.get(METADATA_KEY, {}).get("class_colors") or {}
        return class_palette(self._counts["class"].tolist() if len(self._counts) else [], base=stored)

    def _draw(self) -> None:
        self._figure.clear()
        counts = self._counts
        axes = self._figure.add_subplot(1, 1, 1)
        if counts.empty:
            axes.set_axis_off()
            self._canvas.draw_idle()
            return
        palette = self._palette()
        labels, colors = [], []
        for cell_type, cls in zip(counts["cell_type"], counts["class"]):
            labels.append(f"{cls} ({cell_type})")
            if cls == UNCLASSIFIED:  # as the layer shows them: cell-type colour, faint
                r, g, b, a = CELL_TYPE_COLORS.get(cell_type, UNKNOWN_COLOR)
                colors.append((r, g, b, a * UNCLASSIFIED_ALPHA))
            else:
                colors.append(palette.get(cls, UNKNOWN_COLOR))
        y = np.arange(len(counts))[::-1]
        bars = axes.barh(y, counts["percent"].to_numpy(float), color=colors, edgecolor="0.3", linewidth=0.5)
        for bar, count in zip(bars, counts["count"]):
            axes.annotate(
                str(int(count)), (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
            )
        axes.set_yticks(y, labels=labels, fontsize=7)
        axes.set_xlim(0, 110)
        axes.set_xlabel("% of the cells of that type", fontsize=8)
        axes.tick_params(axis="x", labelsize=7)
        self._figure.set_figheight(max(2.0, 0.22 * len(counts) + 0.8))
        self._canvas.setMinimumHeight(int(self._figure.get_figheight() * self._figure.dpi))
        self._canvas.draw_idle()


def _edit_note(last_edit: dict[str, int] | None, pending: bool) -> str:
    """What the summary adds about hand edits of the cells layer."""
    if pending:
        return ". Cells painted or erased by hand since they were measured: press Update to count them again"
    if not last_edit:
        return ""
    parts = [f"{last_edit[k]} {k}" for k in ("removed", "added", "redrawn") if last_edit.get(k)]
    return f". Measured again after hand edits: {', '.join(parts)}" if parts else ""


def _summary(counts: pd.DataFrame, layer_name: str, edge_cells_left_out: int = 0) -> str:
    note = f"; {edge_cells_left_out} cut by the image edge left out" if edge_cells_left_out else ""
    if counts.empty:
        return f"{layer_name}: no cells{note}"
    per_type = counts.groupby("cell_type", sort=False)["count"].sum()
    total = int(per_type.sum())
    parts = ", ".join(f"{int(n)} {t}" for t, n in per_type.items())
    return f"{layer_name}: {total} cells ({parts}){note}"


def show_counts(viewer: napari.viewer.Viewer, layer: Labels) -> CountsWidget:
    """Open (or reuse) the viewer's "Differential count" dock and count ``layer``."""
    opened = set(viewer.window.dock_widgets)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-smear", WIDGET_NAME)
    if set(viewer.window.dock_widgets) - opened:
        _make_room(dock)
    widget.set_layer(layer)
    return widget


def _content_height(widget) -> int:
    """The height ``widget`` asks for; for a scroll area (the run docks, napari's dock
    wrapper), the height of the form inside it, which the area's own hint caps."""
    from qtpy.QtWidgets import QScrollArea

    scroll = widget if isinstance(widget, QScrollArea) else widget.findChild(QScrollArea)
    if scroll is not None and scroll.widget() is not None:
        chrome = widget.height() - scroll.viewport().height()
        return chrome + scroll.widget().sizeHint().height()
    return widget.sizeHint().height()


def _make_room(dock) -> None:
    """Give a newly opened count dock the height the docks above it do not need: Qt splits
    the column evenly, which left the table and chart out of sight under a Classify dock
    that needed less than half. Done once, so a splitter the user moved stays put."""
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    def resize() -> None:
        try:
            window = dock.parentWidget()
        except RuntimeError:  # the dock (or the viewer) was closed before the event loop came round
            return
        if not isinstance(window, QMainWindow):
            return
        area = window.dockWidgetArea(dock)
        others = [other for other in window.findChildren(QDockWidget)
                  if other is not dock and other.isVisible() and not other.isFloating()
                  and other.widget() is not None and window.dockWidgetArea(other) == area]
        if not others:
            return
        # Qt moves a single dock's splitter only part of the way, so the whole column is
        # sized: the count dock gets what the docks above do not ask for (a Classify
        # dock's form), and at least half the column; they share the rest by their needs
        column = dock.height() + sum(other.height() for other in others)
        needs = [other.height() - other.widget().height() + _content_height(other.widget()) for other in others]
        own = max(column - sum(needs), column // 2)
        shares = [max(1, round((column - own) * need / max(sum(needs), 1))) for need in needs]
        window.resizeDocks([*others, dock], [*shares, own], Qt.Orientation.Vertical)

    # after the event loop has laid the new dock out (a size set before that is undone)
    QTimer.singleShot(0, resize)

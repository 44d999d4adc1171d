"""The "Cell gallery" dock widget: review a classification cell by cell, and correct it.

The cells of a cells layer are shown as thumbnails, a class at a time, the least
confident first (:mod:`napari_smear.gallery` cuts them). Clicking one selects the cell
in its labels layer and centres the view on it; selected cells can be given another
class (:func:`napari_smear._napari.layers.set_cell_classes`), which recolours the
layer and updates the Differential count dock. The corrected classes are what the
Train classifier dock learns from ("cells of the current image").
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from napari.layers import Labels
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
)

from napari_smear._napari.layers import (
    CELL_TYPE_COLORS,
    METADATA_KEY,
    class_palette,
    image_layer_of_cells,
    set_cell_classes,
)
from napari_smear._napari.widgets._cells_dock import CellsLayerDock
from napari_smear.gallery import ORDERS, UNCLASSIFIED, cell_thumbnails, gallery_groups, thumbnail_window_px

if TYPE_CHECKING:
    import napari

__all__ = ["GalleryWidget", "WIDGET_NAME", "PAGE_SIZE"]

WIDGET_NAME = "Cell gallery"
#: Thumbnails added at a time ("Show more" adds the next page): cutting one takes about
#: a millisecond, and a list of thousands of icons makes the dock sluggish.
PAGE_SIZE = 120
THUMBNAIL_SIZE = 80
_NO_CLASS = "(no class)"


def _qimage(rgb: np.ndarray) -> QImage:
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    return QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()  # copy: own the pixels


class GalleryWidget(CellsLayerDock):
    """Dock widget: the cells of a cells layer as thumbnails, a class at a time.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(
            napari_viewer, combo_tooltip="The cells labels layer to review (made by Segment / Classify cells)"
        )
        self._groups: list[tuple[str, str, pd.DataFrame]] = []
        self._shown = 0  # thumbnails of the current group in the list

        self._group_combo = QComboBox()
        self._group_combo.setToolTip(
            "The class whose cells are shown: class (cell type): number of cells, largest first"
        )
        # the class list as wide as its longest entry: "spherocyte (rbc): 90" was cut to ": 9"
        self._group_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self._edge_checkbox = QCheckBox("Leave out cells cut by the image edge")
        self._edge_checkbox.setToolTip(
            "Show only whole cells, as the Differential count does with the same box ticked "
            "(and the batch galleries by default)"
        )
        self._order_combo = QComboBox()
        self._order_combo.addItems(list(ORDERS))
        self._order_combo.setToolTip("Review the cells the model was least sure of first")
        self._list = QListWidget()
        self._list.setViewMode(QListView.ViewMode.IconMode)
        self._list.setIconSize(QSize(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        self._list.setResizeMode(QListView.ResizeMode.Adjust)
        self._list.setMovement(QListView.Movement.Static)
        self._list.setUniformItemSizes(True)
        self._list.setSpacing(2)
        self._list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self._list.setMinimumHeight(2 * (THUMBNAIL_SIZE + 24))
        self._list.setToolTip("Click a cell to select it and centre the view on it; Shift/Ctrl-click to pick several")
        self._status = QLabel("")
        self._status.setWordWrap(True)
        self._more_button = QPushButton("Show more")
        self._class_combo = QComboBox()
        self._class_combo.setEditable(True)
        self._class_combo.setToolTip("The class to give the selected cells (type a new name to add a class)")
        self._set_button = QPushButton("Set class of selected")
        self._set_button.setToolTip(
            "Give the selected cells this class (recorded as set by hand; the model's answer stays in "
            "'model_class'). The layer is recoloured and the Differential count updated."
        )
        self._export_button = QPushButton("Export selected…")
        self._export_button.setToolTip(
            "Write the selected cells as single-cell images into <folder>/<class>/, a training set for "
            "Train classifier ('folder of labelled cell images') or napari-smear train; export the cells "
            "you checked from many images into one folder"
        )
        self._save_button = QPushButton("Save picture…")
        self._save_button.setToolTip("Save a PNG of every class's cells (the least confident first), for a report")

        row = self._layer_row()
        show_row = QHBoxLayout()
        show_row.addWidget(QLabel("class"))
        show_row.addWidget(self._group_combo, 1)
        show_row.addWidget(self._order_combo)
        set_row = QHBoxLayout()
        set_row.addWidget(self._class_combo, 1)
        set_row.addWidget(self._set_button)
        bottom = QHBoxLayout()
        bottom.addWidget(self._more_button)
        bottom.addStretch(1)
        bottom.addWidget(self._export_button)
        bottom.addWidget(self._save_button)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(show_row)
        layout.addWidget(self._edge_checkbox)
        layout.addWidget(self._list, 1)
        layout.addWidget(self._status)
        layout.addLayout(bottom)
        layout.addLayout(set_row)

        self._group_combo.currentIndexChanged.connect(self._on_group_chosen)
        self._order_combo.currentIndexChanged.connect(lambda *_: self.refresh())
        self._edge_checkbox.toggled.connect(lambda *_: self.refresh())
        self._list.itemSelectionChanged.connect(self._on_selection_changed)
        self._more_button.clicked.connect(self.show_more)
        self._set_button.clicked.connect(self._on_set_clicked)
        self._save_button.clicked.connect(self._on_save_clicked)
        self._export_button.clicked.connect(self._on_export_clicked)
        self._follow_layers()

    # ------------------------------------------------------------------ public API
    @property
    def groups(self) -> list[str]:
        """The entries of the class list, as shown (e.g. ``"neutrophil (wbc): 12"``)."""
        return [self._group_combo.itemText(i) for i in range(self._group_combo.count())]

    @property
    def shown_labels(self) -> list[int]:
        """Label ids of the thumbnails in the list, in order."""
        return [int(self._list.item(i).data(Qt.ItemDataRole.UserRole)) for i in range(self._list.count())]

    @property
    def selected_labels(self) -> list[int]:
        """Label ids of the selected thumbnails."""
        return sorted(int(item.data(Qt.ItemDataRole.UserRole)) for item in self._list.selectedItems())

    @property
    def status(self) -> str:
        """What the dock's status line says (the class shown, what was set by hand, problems)."""
        return self._status.text()

    def show_group(self, class_name: str, cell_type: str | None = None) -> None:
        """Show the cells of one class (``"unclassified"`` for those without one)."""
        for index, (group_type, name, _) in enumerate(self._groups):
            if name == class_name and (cell_type is None or group_type == cell_type):
                self._group_combo.setCurrentIndex(index)
                return
        raise ValueError(f"no cells of class {class_name!r} in this layer; classes: "
                         f"{sorted({name for _, name, _ in self._groups})}")

    def select_labels(self, ids) -> None:
        """Select these cells' thumbnails (those shown)."""
        wanted = {int(i) for i in ids}
        self._list.clearSelection()
        for i in range(self._list.count()):
            item = self._list.item(i)
            if int(item.data(Qt.ItemDataRole.UserRole)) in wanted:
                item.setSelected(True)

    def set_class(self, name: str | None, ids=None) -> int:
        """Give the selected cells (or the cells ``ids``) the class ``name`` (None or
        ``"(no class)"``: none); returns how many changed class."""
        if self._layer is None:
            raise ValueError("no cells layer: run Segment cells or Classify cells first")
        ids = self.selected_labels if ids is None else [int(i) for i in ids]
        if not ids:
            raise ValueError("no cells selected: click the thumbnails of the cells to change first")
        name = None if name in (None, "", _NO_CLASS) else name
        changed = set_cell_classes(self._layer, ids, name)
        shown_as = name or "no class"
        self._note = f"{len(ids)} cell{'s' if len(ids) != 1 else ''} set to {shown_as} by hand ({changed} changed)"
        return changed

    @property
    def include_edge_cells(self) -> bool:
        """Whether cells cut by the image edge are shown (the checkbox unticked)."""
        return not self._edge_checkbox.isChecked()

    @include_edge_cells.setter
    def include_edge_cells(self, value: bool) -> None:
        self._edge_checkbox.setChecked(not value)  # toggled -> refresh

    def refresh(self) -> None:
        """Group the layer's cells again and show the current class's thumbnails (as many
        as were shown of it: a correction does not lose the reviewer's place)."""
        current = self._current_key()
        keep = self._shown
        layer = self._layer
        self._groups = []
        problem = None
        if layer is None:
            problem = "No cells layer: run Segment cells or Classify cells first."
        else:
            try:
                self._groups = gallery_groups(self._shown_table(), order=self._order_combo.currentText())
            except ValueError as exc:
                problem = str(exc)
        self._group_combo.blockSignals(True)
        self._group_combo.clear()
        for cell_type, name, rows in self._groups:
            self._group_combo.addItem(f"{name} ({cell_type}): {len(rows)}")
        keys = [(t, n) for t, n, _ in self._groups]
        same_group = current in keys
        if same_group:
            self._group_combo.setCurrentIndex(keys.index(current))
        self._group_combo.blockSignals(False)
        if problem:
            self._list.clear()
            self._shown = 0
            self._status.setText(problem)
            self._fill_class_combo()
            self._update_buttons()
            return
        self._show_group(at_least=keep if same_group else 0)

    def show_more(self) -> None:
        """Add the next page of thumbnails of the current class."""
        group = self._current_group()
        if group is None:
            return
        cell_type, name, rows = group
        page = rows.iloc[self._shown : self._shown + PAGE_SIZE]
        if not len(page):
            return
        colour = self._outline_colour(cell_type, name)
        try:
            image, diameter = self._image_and_ruler()
            thumbs = cell_thumbnails(
                image, self._layer.data, page["label"].to_numpy(np.int64),
                page[["centroid_y", "centroid_x"]].to_numpy(np.float64),
                thumbnail_window_px(cell_type, diameter), size=THUMBNAIL_SIZE, outline_rgb=colour,
            )
        except ValueError as exc:  # no image, or one that no longer fits the cells (replaced by a stack, say)
            self._status.setText(f"Cannot show the cells of {self._layer.name!r}: {exc}")
            return
        confidence = (pd.to_numeric(page["confidence"], errors="coerce").to_numpy()
                      if "confidence" in page.columns else np.full(len(page), np.nan))
        models = page["model"].astype(str).to_numpy() if "model" in page.columns else np.full(len(page), "")
        for thumb, label, conf, model in zip(thumbs, page["label"].to_numpy(), confidence, models):
            text = f"{int(label)}" + (f" · {conf:.2f}" if np.isfinite(conf) else "")
            item = QListWidgetItem(QIcon(QPixmap.fromImage(_qimage(thumb))), text)
            item.setData(Qt.ItemDataRole.UserRole, int(label))
            tip = f"cell {int(label)}: {name} ({cell_type})"
            if np.isfinite(conf):
                tip += f", confidence {conf:.2f}"
            if model:
                tip += f", by {model}"
            item.setToolTip(tip)
            self._list.addItem(item)
        self._shown += len(page)
        self._say()
        self._update_buttons()

    def export_selected(self, folder, ids=None) -> list:
        """Write the selected cells (or the cells ``ids``) as single-cell images into
        ``folder/<class>/`` (see :func:`napari_smear.gallery.export_cell_images`); returns
        the files written."""
        from napari_smear.gallery import export_cell_images

        layer = self._layer
        if layer is None:
            raise ValueError("no cells layer: run Segment cells or Classify cells first")
        ids = self.selected_labels if ids is None else [int(i) for i in ids]
        if not ids:
            raise ValueError("no cells selected: click the thumbnails of the cells to export (Ctrl+A: all shown)")
        image, diameter = self._image_and_ruler()
        features = pd.DataFrame(layer.features)
        by_id = features.set_index("index")
        classes = [by_id.loc[i, "class"] if "class" in by_id.columns and i in by_id.index else "" for i in ids]
        without = [i for i, c in zip(ids, classes) if not (isinstance(c, str) and c)]
        if without:
            raise ValueError(f"cells {without[:10]} have no class: give them one (Set class of selected) first")
        image_layer = image_layer_of_cells(self._viewer, layer)
        # camera programs number their files afresh on every slide (field_001.jpg in each
        # folder): the image's folder goes into the names, so cells of two slides never
        # take each other's place
        source = (image_layer.metadata or {}).get("path")
        stem = f"{Path(source).parent.name}_{image_layer.name}" if source else image_layer.name
        written = export_cell_images(image, _cell_table(features), ids, classes, folder, diameter, stem=stem)
        self._note = f"{len(written)} cell image(s) written into {folder}"
        self._say()
        return written

    def save_picture(self, path) -> str:
        """Write a PNG of every class's cells of the layer (see
        :func:`napari_smear.gallery.gallery_picture`); returns the path."""
        from napari_smear.gallery import gallery_picture
        from napari_smear.io import write_png_atomic

        layer = self._layer
        if layer is None:
            raise ValueError("no cells layer to draw")
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".png")
        elif path.suffix.lower() != ".png":
            raise ValueError(f"the gallery is saved as PNG: give a name ending in .png, not {path.name!r}")
        image, diameter = self._image_and_ruler()
        table = self._shown_table()
        palette = {name: tuple(int(round(255 * c)) for c in colour[:3]) for name, colour in self._palette().items()}
        picture = gallery_picture(image, layer.data, table, diameter, cell_types=None,
                                  order=self._order_combo.currentText(), palette=palette, title=layer.name)
        return str(write_png_atomic(path, picture))

    # ------------------------------------------------------------------ internals
    _note = ""

    def _image_and_ruler(self) -> tuple:
        """The pixels the shown cells were made from and their red-cell diameter; a
        ValueError says why not (never another image of the same size)."""
        layer = self._layer
        image_layer = image_layer_of_cells(self._viewer, layer)
        if image_layer is None:
            raise ValueError("its image layer is not in the viewer (open the image the cells were made from)")
        diameter = layer.metadata.get(METADATA_KEY, {}).get("rbc_diameter_px")
        if diameter is None:
            raise ValueError("the layer has no red-cell size (not made by Segment cells)")
        return (image_layer.data[0] if image_layer.multiscale else image_layer.data), float(diameter)

    def _shown_table(self) -> pd.DataFrame:
        """The layer's cell table, without the cells cut by the edge when those are left out."""
        table = _cell_table(pd.DataFrame(self._layer.features))
        if not self.include_edge_cells and "touches_edge" in table.columns:
            table = table[~table["touches_edge"].fillna(False).astype(bool)]
        return table

    def _current_key(self) -> tuple[str, str] | None:
        group = self._current_group()
        return None if group is None else (group[0], group[1])

    def _current_group(self):
        index = self._group_combo.currentIndex()
        return self._groups[index] if 0 <= index < len(self._groups) else None

    def _on_group_chosen(self, *_: Any) -> None:
        self._note = ""  # what was set by hand was said; another class is looked at now
        self._show_group()

    def _show_group(self, at_least: int = 0) -> None:
        self._list.clear()
        self._shown = 0
        group = self._current_group()
        while True:
            before = self._shown
            self.show_more()
            if self._shown == before or self._shown >= at_least:
                break
        self._fill_class_combo()
        if group is None:
            self._say()
            self._update_buttons()

    def _say(self) -> None:
        group = self._current_group()
        if group is None:
            text = f"{self._layer.name}: no cells" if self._layer is not None else ""
        else:
            cell_type, name, rows = group
            text = f"{len(rows)} {name} ({cell_type})"
            if self._shown < len(rows):
                text += f", {self._shown} shown"
            has_confidence = "confidence" in rows.columns and rows["confidence"].notna().any()
            if self._order_combo.currentText() != "label" and has_confidence:  # no order among unclassified cells
                text += f", {self._order_combo.currentText()}"
        if self._note:
            text += f". {self._note}"
        self._status.setText(text)

    def _update_buttons(self) -> None:
        group = self._current_group()
        self._more_button.setEnabled(group is not None and self._shown < len(group[2]))
        self._set_button.setEnabled(self._layer is not None and bool(self._list.selectedItems()))
        self._export_button.setEnabled(self._layer is not None and bool(self._list.selectedItems()))
        self._save_button.setEnabled(self._layer is not None and bool(self._groups))

    def _palette(self) -> dict[str, tuple]:
        stored = self._layer.metadata.get(METADATA_KEY, {}).get("class_colors") or {} if self._layer else {}
        names = [name for _, name, _ in self._groups if name != UNCLASSIFIED]
        return class_palette(names, base=stored)

    def _outline_colour(self, cell_type: str, name: str) -> tuple[int, int, int]:
        colour = (CELL_TYPE_COLORS.get(cell_type, (0.6, 0.6, 0.6, 1)) if name == UNCLASSIFIED
                  else self._palette().get(name, (0.6, 0.6, 0.6, 1)))
        return tuple(int(round(255 * c)) for c in colour[:3])

    def _fill_class_combo(self) -> None:
        """The classes the shown cells can be given: those of their cell type in the layer
        and in the models that classify that type (a red cell is not offered 'basophil');
        the class shown is chosen."""
        group = self._current_group()
        names: list[str] = []
        if self._layer is not None and group is not None:
            cell_type, shown_class = group[0], group[1]
            features = self._layer.features
            if "class" in features.columns:
                of_type = features[features["cell_type"] == cell_type]
                names += [c for c in of_type["class"] if isinstance(c, str) and c]
            models = self._layer.metadata.get(METADATA_KEY, {}).get("models") or {}
            for entry in models.values() if isinstance(models, dict) else ():
                if isinstance(entry, dict) and cell_type in (entry.get("cell_types") or [cell_type]):
                    names += [str(c) for c in entry.get("classes", [])]
            if not models:  # a layer without the record: every class its features name
                names += [c[2:] for c in features.columns if c.startswith("p_")]
        names = sorted(set(names))
        self._class_combo.blockSignals(True)
        self._class_combo.clear()
        self._class_combo.addItems([*names, _NO_CLASS])
        if group is not None and group[1] in names:
            self._class_combo.setCurrentText(group[1])
        self._class_combo.blockSignals(False)

    def _layer_watched(self, layer: Labels | None) -> None:
        self._note = ""
        if layer is not None:
            layer.events.features.connect(self._schedule_refresh)
            layer.events.data.connect(self._schedule_refresh)
            layer.events.selected_label.connect(self._on_label_picked)

    def _layer_unwatched(self, layer: Labels) -> None:
        layer.events.features.disconnect(self._schedule_refresh)
        layer.events.data.disconnect(self._schedule_refresh)
        layer.events.selected_label.disconnect(self._on_label_picked)

    def _on_label_picked(self, *_: Any) -> None:
        """A cell picked in the viewer (the labels layer's picker): its thumbnail is selected
        when the list shows it, without moving the view the user just clicked in."""
        if self._layer is None:
            return
        label = int(self._layer.selected_label)
        if self.selected_labels == [label]:
            return  # the thumbnail's own click, coming back
        self._list.blockSignals(True)
        try:
            self._list.clearSelection()
            for i in range(self._list.count()):
                item = self._list.item(i)
                if int(item.data(Qt.ItemDataRole.UserRole)) == label:
                    item.setSelected(True)
                    self._list.scrollToItem(item)
                    break
        finally:
            self._list.blockSignals(False)
        self._update_buttons()

    def _on_selection_changed(self) -> None:
        self._update_buttons()
        ids = self.selected_labels
        if len(ids) != 1 or self._layer is None:
            return
        label = ids[0]
        features = self._layer.features
        rows = features.index[features["index"] == label]
        if not len(rows):
            return
        row = features.loc[rows[0]]
        self._layer.selected_label = label
        world = self._layer.data_to_world([float(row["centroid_y"]), float(row["centroid_x"])])
        # napari 0.9 moved the camera under viewer.scene (viewer.camera still works, deprecated)
        camera = self._viewer.scene.camera if hasattr(self._viewer, "scene") else self._viewer.camera
        camera.center = tuple(float(v) for v in world)[-2:]
        self._bring_field_to_top()
        if isinstance(row.get("class"), str) and row["class"]:
            self._class_combo.setCurrentText(row["class"])

    def _bring_field_to_top(self) -> None:
        """With several fields open at the same place (to add up their differential), the
        cell's own field may lie under another one: its image and result layers are moved
        to the top, in their order, so the view shows the cell clicked, not another
        field's pixels there."""
        from napari.layers import Image

        image = image_layer_of_cells(self._viewer, self._layer)
        layers = list(self._viewer.layers)
        if image is None:
            return
        position = next(i for i, layer in enumerate(layers) if layer.unique_id == image.unique_id)
        covered = any(isinstance(layer, Image) and layer.visible for layer in layers[position + 1:]
                      if layer.metadata.get(METADATA_KEY, {}).get("kind") != "attention")
        if not covered:
            return
        info_of = lambda layer: layer.metadata.get(METADATA_KEY, {})  # noqa: E731
        own = [layer for layer in layers[position:] if layer.unique_id == image.unique_id
               or info_of(layer).get("image_layer_id", None) == image.unique_id
               or (info_of(layer).get("image_layer_id") is None and info_of(layer).get("image_layer") == image.name)]
        for layer in own:  # each to the end, in their order: the field's stack is kept
            self._viewer.layers.move(list(self._viewer.layers).index(layer), len(self._viewer.layers))
        self._note = f"{image.name} brought to the top, to show the cell"
        self._say()

    def _on_set_clicked(self) -> None:
        selected = self.selected_labels
        try:
            self.set_class(self._class_combo.currentText(), selected)
        except ValueError as exc:
            self._status.setText(str(exc))
            return
        # the list is rebuilt on the layer's features event: the cells moved to their
        # new class leave this one, as on a CellaVision review screen
        self._say()

    def _on_export_clicked(self) -> None:
        if self._layer is None:
            return
        folder = QFileDialog.getExistingDirectory(self, "Folder of labelled cell images (one sub-folder per class)")
        if folder:
            try:
                self.export_selected(folder)
            except (OSError, ValueError) as exc:
                self._status.setText(f"Not exported: {exc}")

    def _on_save_clicked(self) -> None:
        if self._layer is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the cell gallery", f"{self._layer.name} gallery.png", "PNG images (*.png)"
        )
        if path:
            try:
                self.save_picture(path)
            except (OSError, ValueError) as exc:
                self._status.setText(f"Not saved: {exc}")
            else:
                self._status.setText(f"Saved {path}")


def _cell_table(features: pd.DataFrame) -> pd.DataFrame:
    """A cells layer's features as a cell table (``label`` the label id: the ``index`` column)."""
    return features if "label" in features.columns else features.rename(columns={"index": "label"})


def show_gallery(viewer: napari.viewer.Viewer, layer: Labels) -> GalleryWidget:
    """Open (or reuse) the viewer's "Cell gallery" dock and show the cells of ``layer``."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-smear", WIDGET_NAME)
    widget.set_layer(layer)
    return widget

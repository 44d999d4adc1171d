"""The "Segment cells" dock widget: whole-smear segmentation in a background thread."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FloatSpinBox
from napari.layers import Image

from napari_smear._napari.layers import attention_layers_of, segmentation_layers, show_layers
from napari_smear._napari.widgets._background import (
    BackgroundTaskWidget,
    Cancelled,
    ImageLayerChoice,
    capture_geometry,
    stack_problem,
)

if TYPE_CHECKING:
    import napari

    from napari_smear.segment.types import SmearSegmentation

__all__ = ["SegmentWidget", "SegmentationCancelled", "DETAIL_CHOICES", "detail_combo"]

#: The "detail" choices: red-cell diameter in working pixels (segment_smear's
#: working_diameter_px). On a 100 MP scan 16 px took 15.3 s against 23.0 s at 24 px,
#: with WBC Dice 0.927 against 0.932 and Chula point recall 0.986 against 0.985
#: (docs/benchmarks.md, "Working resolution").
DETAIL_CHOICES = (("standard", 24.0), ("faster (large scans)", 16.0))


def detail_combo() -> ComboBox:
    """The "detail" choice of the Segment cells and Batch widgets (value: working px per red cell)."""
    return ComboBox(
        label="detail",
        choices=list(DETAIL_CHOICES),
        value=DETAIL_CHOICES[0][1],
        tooltip="standard: red cells segmented at 24 px across; faster: at 16 px, about 1.5 times as fast "
        "on large scans, outlines a little coarser",
    )

#: Raised inside ``segment_smear``'s progress callback to stop a run the user cancelled.
SegmentationCancelled = Cancelled


class SegmentWidget(ImageLayerChoice, BackgroundTaskWidget):
    """Dock widget: segment the cells of a smear image layer.

    Choose the image layer, optionally its pixel size (0 = estimate the scale from the
    red cells) and the detail ("faster" segments large scans at a lower working
    resolution), press Run. Segmentation runs in a background thread (progress bar,
    Cancel button; a cancelled run adds no layers); the result is shown as a labels
    layer ``"<image> cells"`` coloured by cell type with the per-cell table as
    features, and ``"<image> nuclei"``. Running again on the same image replaces those
    layers' contents.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).
    """

    task_name = "segmentation"
    result_name = "segmentation"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        self._image_combo = ComboBox(
            label="image",
            choices=self._image_layer_choices,
            tooltip="The RGB (or grayscale) smear image layer to segment",
        )
        self._pixel_size = FloatSpinBox(
            label="pixel size (µm)",
            value=0.0,
            min=0.0,
            max=100.0,
            step=0.001,
            tooltip="Physical pixel size in micrometres; 0 = estimate the scale from "
            "the red cells in the image. The image's own pixel size (from its file) is filled "
            "in and checked against the red cells: a calibration they contradict (off by more "
            "than 1.6 times) is ignored with a warning. A size typed in here is used as it is.",
        )
        self._filled_pixel_size: float | None = None
        self._pixel_size.native.setDecimals(4)
        self._detail = detail_combo()
        self.extend([self._image_combo, self._pixel_size, self._detail, *self._run_controls()])
        self._image_combo.changed.connect(self._on_image_changed)
        self.reset_choices()
        self._on_image_changed(self._image_combo.value)

    # ------------------------------------------------------------------ public API
    def run(self) -> None:
        """Start segmenting the chosen image layer (no-op while a run is active; see
        :attr:`run_finished`)."""
        if self.is_running:
            return
        layer = self._image_combo.value
        if layer is None:
            self._decline("No image layer: open or add an image first.", "open or add an image layer first")
            return
        problem = stack_problem(layer)
        if problem:
            self._decline(f"Cannot segment: {problem}.", problem)
            return
        try:
            from napari_smear.segment import segment_smear
        except ImportError as exc:
            self._fail(f"segmentation is not available: {exc}")
            return
        if not self._replacing_confirmed(f"{layer.name} cells"):
            return
        image = layer.data[0] if layer.multiscale else layer.data
        pixel_size = float(self._pixel_size.value) or None
        # the layer's own pixel size, left in the box as it was filled in, is checked
        # against the red cells like a file's; a size typed in is the user's word
        recorded = pixel_size if pixel_size and pixel_size == self._filled_pixel_size else None
        working_diameter = float(self._detail.value)
        target = {"image_layer_name": layer.name, **capture_geometry(layer)}

        def compute(report):
            report((0.0, "starting"))
            # The pixels are materialised here, on the helper thread, so a lazy (dask)
            # layer does not freeze the viewer while it loads.
            pixels = np.asarray(image)
            return segment_smear(
                pixels, pixel_size_um=None if recorded else pixel_size, recorded_pixel_size_um=recorded,
                working_diameter_px=working_diameter,
                progress=lambda f, m="": report((float(f), str(m))),
            )

        scale_text = (f"{pixel_size:g} µm/px, checked against the red cells" if recorded
                      else f"{pixel_size:g} µm/px" if pixel_size else "automatic scale")
        if working_diameter != DETAIL_CHOICES[0][1]:
            scale_text += f", {dict((v, k) for k, v in DETAIL_CHOICES).get(working_diameter, 'custom')} detail"
        self._start(
            compute,
            status=f"Segmenting {layer.name!r} ({scale_text})…",
            on_progress=self._on_progress,
            on_result=lambda result: self._show_result(result, target),
            thread_name="napari-smear-segment",
        )

    # ------------------------------------------------------------------ callbacks
    def _image_layer_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        from napari_smear._napari.widgets.classify import image_layer_choices

        return image_layer_choices(self._viewer)  # not the attention maps

    def _on_image_changed(self, layer: Image | None) -> None:
        if layer is None or self.is_running:
            return
        from napari_smear._napari.layers import layer_pixel_size_um

        pixel_size = layer_pixel_size_um(layer)  # the file's, else a scale in µm
        self._pixel_size.value = float(pixel_size) if pixel_size else 0.0
        self._filled_pixel_size = float(self._pixel_size.value) or None

    def _on_progress(self, update: tuple[float, str]) -> None:
        fraction, message = update
        self._show_fraction(fraction)
        if message:
            self._set_status(f"Segmenting: {message}")

    def _show_result(self, result: SmearSegmentation, target: dict) -> None:
        if self._image_was_removed(target):
            return
        target = self._current_target(target)
        show_layers(self._viewer, segmentation_layers(result, **target))
        # attention maps of the cells this replaces would sit over the new cells as if
        # they were theirs
        stale = attention_layers_of(self._viewer, target["image_layer_name"], target.get("image_layer_id"))
        for layer in stale:
            self._viewer.layers.remove(layer)
        self._progress.value = 100
        removed = (
            f"; removed {len(stale)} attention map{'s' if len(stale) > 1 else ''} of the cells segmented before"
            if stale else ""
        )
        self._set_status(_summary(result) + removed)
        self._show_notes(result.params.get("warnings"))


def _summary(seg: SmearSegmentation) -> str:
    counts = seg.counts()
    # the types are wbc, rbc (abbreviations, read as they are) and platelet
    parts = ", ".join(f"{count} {cell_type}{'s' if cell_type == 'platelet' and count != 1 else ''}"
                      for cell_type, count in counts.items())
    diameter = f"RBC diameter {seg.rbc_diameter_px:.1f} px"
    if seg.pixel_size_um:
        diameter += f" ({seg.rbc_diameter_px * seg.pixel_size_um:.1f} µm)"
    text = f"{seg.n_cells} cells: {parts}; {diameter}"
    outside = seg.params.get("outside_view_share")
    if outside:
        # say it: the user sees a black frame with no cells in it and should know why
        text += (f"; {outside:.0%} of the image is outside the view (an eyepiece's black frame, or a "
                 "black or white fill where nothing was scanned) and was left out")
    if seg.params.get("overlay_share"):
        text += "; a burned-in green annotation (scale bar, text) was painted out as glass"
    return text

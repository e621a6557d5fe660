"""The request panel: model, prompt or image, size, steps, guidance, seed, strategy and devices.

It builds a `GenerationRequest` from its fields (`request()`) and restores every field from one
(`set_request()`, used by "use these settings" and the remembered last request). The fields
follow the model: prompt and negative prompt for text models, an image for Stable Video
Diffusion, frames/size/fps for video, seconds for audio, each starting at the model's defaults.
A number field at its lowest value reads "auto": the engine uses the model's default.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from PySide6.QtCore import QRegularExpression, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QPixmap, QRegularExpressionValidator, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from engine.checkpoints import load_checkpoints
from engine.protocol import MAX_FRAMES, MAX_SIDE, MAX_STEPS, GenerationRequest
from ui.lora_list import LoraList
from ui.model_info import ModelInfo
from ui.strategy_picker import StrategyPicker
from ui.validation import CheckResult, Validation, fix_action, fix_words

AUTO = "auto"
SEED_MODES = ("fixed", "random", "increment")
MAX_SEED = 2**63 - 1
RANDOM_SEED_LIMIT = 2**31 - 1  # random seeds stay short enough to read and type
GET_PREFIX = "get:"  # item data of a checkpoint that is not installed
SOURCE_TITLES = {
    "embedded": "Embedded",
    "local": "Local folders",
    "downloaded": "Downloaded",
    "hf-cache": "Hugging Face cache",
}
IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.webp *.bmp)"
THUMBNAIL_SIZE = (120, 80)
RANDOM_WEIGHTS = "random weights, outputs noise"
CHECK_DELAY_MS = 250  # ask the engine once typing pauses, not on every key
INVALID_STYLE = "border: 2px solid #d04040; border-radius: 3px;"


def wrapping_label() -> QLabel:
    """A label that wraps and never widens its layout (a long engine error must not grow the window)."""
    label = QLabel(wordWrap=True)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def _int_field(maximum: int, step: int = 1) -> QSpinBox:
    """An integer field whose lowest value (0) reads "auto"."""
    box = QSpinBox()
    box.setRange(0, maximum)
    box.setSingleStep(step)
    box.setSpecialValueText(AUTO)
    return box


def _float_field(maximum: float, step: float, decimals: int, auto_at: float = 0.0) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(auto_at, maximum)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    box.setSpecialValueText(AUTO)
    return box


def _get(box: QSpinBox | QDoubleSpinBox) -> Any:
    """The field's value, or None on "auto"."""
    return None if box.value() == box.minimum() else box.value()


def _set(box: QSpinBox | QDoubleSpinBox, value: Any) -> None:
    box.setValue(box.minimum() if value is None else value)


class RequestPanel(QWidget):
    generate_requested = Signal(object)  # the GenerationRequest to submit
    model_folder_added = Signal(str)
    get_models_requested = Signal(str)  # open the Models dialog at this checkpoint ("": none)
    changed = Signal()
    check_wanted = Signal(object)  # the GenerationRequest to ask the engine about (debounced)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._models: dict[str, ModelInfo] = {}
        self._output: str | None = None  # a folder named by a restored request (never a file)
        self.lora_list = LoraList()
        self._last_model: str | None = None  # the model picked before a "not installed" entry
        self._connected = False
        self._generate_when_checked = False  # Generate pressed while an answer was on its way
        self._empty_prompt_ok = False  # asked once per session
        self.validation = Validation()
        self._check_timer = QTimer(self, singleShot=True, interval=CHECK_DELAY_MS)
        self._check_timer.timeout.connect(self.check_now)

        # Model
        self.model_box = QComboBox()
        self.model_box.setMinimumContentsLength(16)
        self.model_box.currentIndexChanged.connect(self._on_model_changed)
        self.add_folder_button = QToolButton(text="Add model folder...")
        self.add_folder_button.clicked.connect(self.pick_model_folder)
        self.get_models_button = QToolButton(text="Get models...")
        self.get_models_button.setToolTip("Download checkpoints (CogVideoX, SVD, Wan, ...) from the hub")
        self.get_models_button.clicked.connect(lambda: self.get_models_requested.emit(""))
        self.model_note = QLabel(wordWrap=True)
        self.model_note.setStyleSheet("color: palette(mid);")

        # Conditioning
        self.prompt = QPlainTextEdit(placeholderText="Describe the clip")
        self.prompt.setTabChangesFocus(True)
        self.prompt.setFixedHeight(72)
        self.negative_prompt = QPlainTextEdit(placeholderText="What to avoid (optional)")
        self.negative_prompt.setTabChangesFocus(True)
        self.negative_prompt.setFixedHeight(44)
        self.image_path = QLineEdit(placeholderText="Conditioning image")
        self.image_path.textChanged.connect(self._update_thumbnail)
        self.image_button = QToolButton(text="Browse...")
        self.image_button.clicked.connect(self._pick_image)
        self.image_thumb = QLabel()
        self.image_thumb.setFixedSize(*THUMBNAIL_SIZE)
        self.image_thumb.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image_thumb.setStyleSheet("border: 1px solid palette(mid);")
        self.image_row = QWidget()
        image_layout = QHBoxLayout(self.image_row)
        image_layout.setContentsMargins(0, 0, 0, 0)
        image_column = QVBoxLayout()
        image_column.addWidget(self.image_path)
        image_column.addWidget(self.image_button, alignment=Qt.AlignmentFlag.AlignLeft)
        image_layout.addLayout(image_column, 1)
        image_layout.addWidget(self.image_thumb)

        # Shape of the clip
        self.frames = _int_field(MAX_FRAMES)  # the engine's cap, so every value it suggests fits
        self.height_box = _int_field(MAX_SIDE, 8)
        self.width_box = _int_field(MAX_SIDE, 8)
        self.fps = _int_field(120)
        self.seconds = _float_field(600.0, 0.5, 2)

        # Sampling
        self.steps = _int_field(MAX_STEPS)
        # Guidance 0 is a real value (no guidance), so "auto" sits just below it.
        self.guidance = _float_field(100.0, 0.5, 2, auto_at=-0.5)
        # A new seed each session (and, in "random" mode, each Generate); the clip's sidecar keeps it.
        self.seed = QLineEdit(str(random.randint(0, RANDOM_SEED_LIMIT)))
        self.seed.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{1,19}")))
        self.seed_mode = QComboBox()
        for mode in SEED_MODES:
            self.seed_mode.addItem(mode, mode)
        self.seed_mode.setToolTip(
            "After each Generate: fixed keeps the seed, random picks a new one, increment adds 1."
        )
        self.dice = QToolButton(text="New")
        self.dice.setToolTip("New random seed now")
        self.dice.clicked.connect(lambda: self.seed.setText(str(random.randint(0, RANDOM_SEED_LIMIT))))

        self.strategy_picker = StrategyPicker()
        self.prompt_note = wrapping_label()
        self.prompt_note.setText(
            "The prompt is empty: the clip will be about nothing in particular. Type one, or press "
            "Generate again to go ahead without."
        )
        self.prompt_note.hide()
        self.prompt.textChanged.connect(self.prompt_note.hide)
        self.problem_label = wrapping_label()
        self.problem_label.setStyleSheet("color: #d04040;")
        self.problem_label.hide()
        self.fix_button = QPushButton()
        self.fix_button.setToolTip("Apply the engine's suggested value")
        self.fix_button.clicked.connect(self.apply_fix)
        self.fix_button.hide()
        self.validation.observe(lambda _v: self._show_validation())
        self.generate_button = QPushButton("Generate")
        self.generate_button.setToolTip("Queue this request (Ctrl+Enter)")
        self.generate_button.setDefault(True)
        self.generate_button.clicked.connect(self.generate)
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(self.generate)

        self._layout_fields()
        for signal in (
            self.prompt.textChanged,
            self.negative_prompt.textChanged,
            self.image_path.textChanged,
            self.seed.textChanged,
            self.seed_mode.currentIndexChanged,
            self.strategy_picker.changed,
            self.lora_list.changed,
            *(box.valueChanged for box in self._number_fields().values()),
        ):
            signal.connect(self._on_changed)
        self._on_model_changed()

    def _layout_fields(self) -> None:
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_box, 1)
        model_row.addWidget(self.add_folder_button)
        model_row.addWidget(self.get_models_button)
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.seed_mode)
        seed_row.addWidget(self.dice)

        self.form = QFormLayout()
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.addRow("Model", model_row)
        self.form.addRow("", self.model_note)
        self.form.addRow("Prompt", self.prompt)
        self.form.addRow("", self.prompt_note)
        self.form.addRow("Negative", self.negative_prompt)
        self.form.addRow("Image", self.image_row)
        self.form.addRow("Frames", self.frames)
        self.form.addRow("Height", self.height_box)
        self.form.addRow("Width", self.width_box)
        self.form.addRow("FPS", self.fps)
        self.form.addRow("Seconds", self.seconds)
        self.form.addRow("Steps", self.steps)
        self.form.addRow("Guidance", self.guidance)
        self.form.addRow("Seed", seed_row)
        self.form.addRow("LoRA", self.lora_list)

        strategy_group = QGroupBox("Strategy and devices")
        strategy_layout = QVBoxLayout(strategy_group)
        strategy_layout.addWidget(self.strategy_picker)

        layout = QVBoxLayout(self)
        layout.addLayout(self.form)
        layout.addWidget(strategy_group)
        layout.addWidget(self.problem_label)
        layout.addWidget(self.fix_button, alignment=Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(self.generate_button)
        layout.addStretch(1)

    def _number_fields(self) -> dict[str, QSpinBox | QDoubleSpinBox]:
        return {
            "frames": self.frames,
            "height": self.height_box,
            "width": self.width_box,
            "fps": self.fps,
            "seconds": self.seconds,
            "steps": self.steps,
            "guidance_scale": self.guidance,
        }

    # ---- catalog ------------------------------------------------------------------------------
    def set_catalog(self, catalog: dict[str, Any]) -> None:
        """Fill the model and strategy pickers; keeps the current request."""
        keep = self.request()
        self._models = {}
        self.model_box.blockSignals(True)
        self.model_box.clear()
        by_source: dict[str, list[ModelInfo]] = {}
        for entry in catalog.get("models", []):
            info = ModelInfo.from_entry(entry)
            self._models[info.name] = info
            by_source.setdefault(info.source, []).append(info)
        for source, infos in by_source.items():
            self._add_header(SOURCE_TITLES.get(source, source))
            for info in infos:
                label = f"  {info.name}" + ("  (random weights)" if info.random_weights else "")
                self.model_box.addItem(label, info.name)
                tip = f"{info.family} ({info.modality})\n{info.path}\n{info.description}".strip()
                self.model_box.setItemData(self.model_box.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        self._add_not_installed()
        self.model_box.blockSignals(False)
        self.strategy_picker.set_catalog(catalog.get("strategies", []), catalog.get("devices", []))
        if keep.model and keep.model in self._models:
            self.set_request(keep)
        elif self._models:
            # First catalog, or the model went away: the first model, at its defaults.
            self._select_model(next(iter(self._models)))
            self._apply_defaults()
            self.strategy_picker.set_value(keep.strategy, keep.strategy_options, keep.devices)
        if self._connected:
            self._check_timer.start()

    def _add_not_installed(self) -> None:
        """The checkpoints `pull` knows that the catalog lacks; picking one opens the Models dialog."""
        listed = set(self._models)  # names; hub ids for the HF cache and pulls by hub id
        missing = [c for c in load_checkpoints() if c.name not in listed and c.hub_id not in listed]
        if not missing:
            return
        self._add_header("Not installed (pick one to get it)")
        for checkpoint in missing:
            self.model_box.addItem(f"  {checkpoint.name} ↓", GET_PREFIX + checkpoint.name)
            tip = f"{checkpoint.hub_id}: not installed; choose it to open Get models"
            self.model_box.setItemData(self.model_box.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)

    def _add_header(self, title: str) -> None:
        self.model_box.addItem(title)
        item = self.model_box.model().item(self.model_box.count() - 1)
        item.setEnabled(False)  # a section title, not a choice

    def _select_model(self, name: str) -> None:
        index = self.model_box.findData(name)
        if index < 0:  # not in the catalog: keep it, showing every field
            self._models[name] = ModelInfo.unknown(name)
            self.model_box.addItem(f"  {name}", name)
            index = self.model_box.count() - 1
        self.model_box.blockSignals(True)
        self.model_box.setCurrentIndex(index)
        self.model_box.blockSignals(False)
        self._last_model = name
        self._show_fields()

    def select_model(self, name: str) -> None:
        """Pick a catalog model, its fields at their defaults (as if the user had chosen it)."""
        index = self.model_box.findData(name)
        if index >= 0:
            self.model_box.setCurrentIndex(index)

    def model_info(self) -> ModelInfo | None:
        name = self.model_box.currentData()
        return self._models.get(name) if name else None

    # ---- request <-> fields -------------------------------------------------------------------
    def request(self) -> GenerationRequest:
        """The request the fields describe (hidden fields are left to the model: None or "")."""
        info = self.model_info()
        shows = info.shows if info is not None else (lambda name: True)
        strategy, options, devices = self.strategy_picker.value()
        values: dict[str, Any] = {
            name: _get(box) if shows(name) else None for name, box in self._number_fields().items()
        }
        image = self.image_path.text().strip()
        return GenerationRequest(
            model=self.model_box.currentData() or "",
            prompt=self.prompt.toPlainText() if shows("prompt") else "",
            negative_prompt=self.negative_prompt.toPlainText() if shows("negative_prompt") else "",
            image=image if image and shows("image") else None,
            seed=int(self.seed.text() or 0),
            strategy=strategy,
            strategy_options=options,
            devices=devices,
            output=self._output,
            loras=self.lora_list.value(),
            **values,
        )

    def set_request(self, request: GenerationRequest) -> None:
        """Show `request` in the fields (every field; an output file name is not kept, since clips are
        never overwritten, but an output folder is)."""
        self._select_model(request.model)
        self.prompt.setPlainText(request.prompt)
        self.negative_prompt.setPlainText(request.negative_prompt)
        self.image_path.setText(request.image or "")
        for name, box in self._number_fields().items():
            _set(box, getattr(request, name))
        self.seed.setText(str(request.seed))
        output = request.output
        self._output = output if output and (output.endswith("/") or Path(output).is_dir()) else None
        self.lora_list.set_value(request.loras)
        self.strategy_picker.set_value(request.strategy, request.strategy_options, request.devices)
        self._update_context()

    def seed_mode_value(self) -> str:
        return self.seed_mode.currentData()

    def set_seed_mode(self, mode: str) -> None:
        index = self.seed_mode.findData(mode)
        if index >= 0:
            self.seed_mode.setCurrentIndex(index)

    # ---- actions ------------------------------------------------------------------------------
    def generate(self) -> None:
        """Emit the request, then move the seed on as its mode says (for the next Generate).

        An answer still on its way (an edit within the last moment) is waited for first."""
        if not self.generate_button.isEnabled():
            return
        request = self.request()
        if not request.model:
            return
        if self._check_timer.isActive() or self.validation.pending:
            self._generate_when_checked = True
            self.check_now()
            return
        info = self.model_info()
        empty = info is not None and info.shows("prompt") and not request.prompt.strip()
        if empty and not self._empty_prompt_ok:
            # Asked once a session, without a modal dialog: a second Generate goes ahead.
            self._empty_prompt_ok = True
            self.prompt_note.show()
            self.prompt.setFocus()
            return
        self.prompt_note.hide()
        self.generate_requested.emit(request)
        self.advance_seed()

    # ---- validation (the engine's `check`) ----------------------------------------------------
    def set_connected(self, connected: bool) -> None:
        self._connected = connected
        if connected:
            self.check_now()
        self._update_generate()

    def check_now(self) -> None:
        self._check_timer.stop()
        if self._connected and self.model_box.currentData():
            self.validation.set_pending()
            self.check_wanted.emit(self.request())

    def set_check_result(self, result: CheckResult) -> None:
        """The engine's answer to the latest `check_wanted` (older answers are dropped by the caller)."""
        self.validation.set_result(result)
        if self._generate_when_checked:
            self._generate_when_checked = False
            if not result.invalid:
                self.generate()

    def _field_widgets(self) -> dict[str, QWidget]:
        widgets: dict[str, QWidget] = {
            **self._number_fields(),
            "model": self.model_box,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "image": self.image_path,
            "seed": self.seed,
            "strategy": self.strategy_picker.strategy_box,
            "devices": self.strategy_picker.devices_widget(),
        }
        for name, box in self.strategy_picker.option_boxes().items():
            widgets[f"strategy_options.{name}"] = box
        return widgets

    def _show_validation(self) -> None:
        result = self.validation.result
        gpus = self.strategy_picker.has_gpus()
        for name, widget in self._field_widgets().items():
            bad = result.invalid and result.field == name
            widget.setStyleSheet(INVALID_STYLE if bad else "")
            widget.setToolTip(result.problem if bad else "")
        if result.invalid:
            action = fix_action(result.field, result.value, gpus)
            self.problem_label.setText(
                result.problem if action else f"{result.problem} {fix_words(result.fix, gpus)}"
            )
            self.fix_button.setText(action or "")
            self.fix_button.setVisible(action is not None)
        self.problem_label.setVisible(result.invalid)
        if not result.invalid:
            self.fix_button.hide()
        self.strategy_picker.set_runnable(not result.invalid)
        self._update_generate()

    def _update_generate(self) -> None:
        invalid = self.validation.invalid
        self.generate_button.setEnabled(self._connected and not invalid)
        self.generate_button.setToolTip(
            "Fix the request first: " + self.validation.result.problem
            if invalid
            else "Queue this request (Ctrl+Enter)"
        )

    def apply_fix(self) -> None:
        """Set the field at fault to the engine's suggested value."""
        result = self.validation.result
        field, value = result.field, result.value
        if field is None or value is None:
            return
        if field in self._number_fields():
            _set(self._number_fields()[field], value)
        elif field == "devices":
            self.strategy_picker.choose_devices(str(value))
        elif field == "strategy":
            self.strategy_picker.choose_strategy(str(value))
        elif field.startswith("strategy_options."):
            box = self.strategy_picker.option_boxes().get(field.split(".", 1)[1])
            if box is not None:
                box.setValue(int(value))
        elif field == "seed":
            self.seed.setText(str(value))
        self.check_now()  # at once: the user expects the mark to go

    def advance_seed(self) -> None:
        mode = self.seed_mode_value()
        if mode == "random":
            self.seed.setText(str(random.randint(0, RANDOM_SEED_LIMIT)))
        elif mode == "increment":
            self.seed.setText(str(min(int(self.seed.text() or 0) + 1, MAX_SEED)))

    def _on_model_changed(self) -> None:
        data = self.model_box.currentData()
        if isinstance(data, str) and data.startswith(GET_PREFIX):
            # not a model yet: go back to the one before and offer the download
            self.model_box.blockSignals(True)
            self.model_box.setCurrentIndex(max(self.model_box.findData(self._last_model), 0))
            self.model_box.blockSignals(False)
            self.get_models_requested.emit(data[len(GET_PREFIX) :])
            return
        self._last_model = data
        self._show_fields()
        self._apply_defaults()
        self._on_changed()

    def _apply_defaults(self) -> None:
        info = self.model_info()
        defaults = info.defaults if info is not None else {}
        for name, box in self._number_fields().items():
            _set(box, defaults.get(name))

    def _show_fields(self) -> None:
        info = self.model_info()
        rows = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "image": self.image_row,
            "frames": self.frames,
            "height": self.height_box,
            "width": self.width_box,
            "fps": self.fps,
            "seconds": self.seconds,
        }
        for name, widget in rows.items():
            self.form.setRowVisible(widget, info is None or info.shows(name))
        if info is None:
            self.model_note.setText("No model yet: waiting for the engine's catalog.")
        elif not info.known:
            self.model_note.setText("Not in the catalog: every field is shown; the engine checks them.")
        else:
            note = f"{info.family}, {info.modality}, {info.source}"
            self.model_note.setText(f"{note}; {RANDOM_WEIGHTS} (for tests)" if info.random_weights else note)
        self.model_note.setToolTip(info.description if info else "")

    def _on_changed(self) -> None:
        self._update_context()
        if self._connected:  # no engine, nobody to ask: the run decides
            self.validation.set_pending()
            self._check_timer.start()
        self.changed.emit()

    def _update_context(self) -> None:
        self.strategy_picker.set_context(_get(self.steps), self.model_info())

    def _update_thumbnail(self) -> None:
        path = self.image_path.text().strip()
        pixmap = QPixmap(path) if path and Path(path).is_file() else QPixmap()
        if pixmap.isNull():
            self.image_thumb.setText("no image" if not path else "unreadable")
            self.image_thumb.setPixmap(QPixmap())
        else:
            self.image_thumb.setPixmap(
                pixmap.scaled(
                    *THUMBNAIL_SIZE,
                    Qt.AspectRatioMode.KeepAspectRatio,
                    Qt.TransformationMode.SmoothTransformation,
                )
            )

    def _pick_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Conditioning image", self.image_path.text(), IMAGE_FILTER
        )
        if path:
            self.image_path.setText(path)

    def pick_model_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (diffusers layout)")
        if folder:
            self.model_folder_added.emit(folder)

"""The request panel builds a GenerationRequest from its fields and restores every field from one."""

from __future__ import annotations

import dataclasses

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox

from engine.protocol import GenerationRequest
from ui.request_panel import RequestPanel

REQUESTS = [
    GenerationRequest(
        model="tiny-cogvideox",
        prompt="a red circle\nmoving right",
        negative_prompt="blur",
        seed=123456789012345,
        steps=7,
        guidance_scale=0.0,
        frames=13,
        height=64,
        width=96,
        fps=12,
        strategy="parastep",
        strategy_options={"warmup": 2},
        devices="cpu:3",
        loras=[{"path": "/loras/style.safetensors", "weight": 0.7}],
    ),
    GenerationRequest(
        model="tiny-svd",
        image="/tmp/conditioning.png",
        seed=5,
        steps=9,
        guidance_scale=2.5,
        frames=8,
        height=64,
        width=96,
        fps=7,
        strategy="batchstep",
        strategy_options={"warmup": 1, "lookahead": 3},
        devices="cpu:1",
    ),
    GenerationRequest(
        model="tiny-audioldm2",
        prompt="rain on a tin roof",
        negative_prompt="music",
        seed=0,
        steps=20,
        guidance_scale=3.5,
        seconds=1.5,
        strategy="sequential",
        devices="cpu:1",
    ),
    # Not in the catalog (a folder from another machine), on GPUs this machine does not have.
    GenerationRequest(model="/models/elsewhere", prompt="x", strategy="parastep", devices="cuda:0,1"),
]


@pytest.fixture
def panel(qtbot, catalog):
    panel = RequestPanel()
    qtbot.addWidget(panel)
    panel.set_catalog(catalog)
    return panel


def test_first_catalog_selects_a_model_at_its_defaults(panel, catalog):
    request = panel.request()
    entry = next(m for m in catalog["models"] if m["name"] == request.model)
    for name, value in entry["defaults"].items():
        if hasattr(request, name):
            assert getattr(request, name) == value, name


def test_fields_build_the_request(panel, qtbot):
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-cogvideox"))
    panel.prompt.setPlainText("a blue square")
    panel.negative_prompt.setPlainText("noise")
    panel.frames.setValue(9)
    panel.height_box.setValue(64)
    panel.width_box.setValue(96)
    panel.fps.setValue(0)  # "auto": the model's default
    panel.steps.setValue(6)
    panel.guidance.setValue(4.5)
    panel.seed.setText("42")
    picker = panel.strategy_picker
    picker.strategy_box.setCurrentIndex(picker.strategy_box.findData("parastep"))
    picker.cpu_workers.setValue(2)
    assert panel.request() == GenerationRequest(
        model="tiny-cogvideox",
        prompt="a blue square",
        negative_prompt="noise",
        seed=42,
        steps=6,
        guidance_scale=4.5,
        frames=9,
        height=64,
        width=96,
        fps=None,
        strategy="parastep",
        strategy_options={},  # warm-up left on auto
        devices="cpu:2",
    )
    assert panel.fps.text() == "auto"


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.model)
def test_use_these_settings_restores_every_field(panel, request_):
    panel.set_request(GenerationRequest(model="tiny-cogvideox", prompt="something else", seed=9))
    panel.set_request(request_)
    assert panel.request() == request_
    # Every field of the dataclass took part (so a new field cannot be forgotten here).
    assert {f.name for f in dataclasses.fields(GenerationRequest)} == set(dataclasses.asdict(panel.request()))


def test_fields_follow_the_model_family(panel):
    def visible(widget):
        return panel.form.isRowVisible(widget)

    panel.set_request(GenerationRequest(model="tiny-audioldm2"))
    assert visible(panel.prompt) and visible(panel.seconds)
    assert not visible(panel.frames) and not visible(panel.image_row)
    panel.set_request(GenerationRequest(model="tiny-svd"))
    assert visible(panel.image_row) and visible(panel.frames)
    assert not visible(panel.prompt) and not visible(panel.seconds)
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-cogvideox"))
    assert visible(panel.prompt) and visible(panel.frames) and not visible(panel.image_row)
    assert panel.height_box.value() == 128  # tiny-cogvideox's studio.json default


def test_seed_modes_and_ctrl_enter(panel, qtbot):
    panel.seed.setText("10")
    panel.prompt.setPlainText("a red circle")
    sent = []
    panel.generate_requested.connect(sent.append)
    panel.set_seed_mode("increment")
    panel.show()
    panel.activateWindow()
    qtbot.waitUntil(panel.isActiveWindow)
    panel.prompt.setFocus()
    qtbot.keyClick(panel.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    panel.generate()
    assert [r.seed for r in sent] == [10, 11] and panel.seed.text() == "12"
    panel.set_seed_mode("fixed")
    panel.generate()
    assert sent[-1].seed == 12 and panel.seed.text() == "12"
    panel.set_seed_mode("random")
    panel.generate()
    assert sent[-1].seed == 12 and panel.seed.text() != ""


def test_ideal_speedup_follows_the_choice(panel):
    picker = panel.strategy_picker
    panel.set_request(
        GenerationRequest(
            model="tiny-cogvideox",
            steps=50,
            strategy="parastep",
            strategy_options={"warmup": 5},
            devices="cpu:4",
        )
    )
    assert picker.speedup_label.text() == "ideal speedup 2.94×  (T=50, W=5, N=4)"  # 50 / (5 + ceil(45 / 4))
    picker.cpu_workers.setValue(2)
    assert picker.speedup_label.text() == "ideal speedup 1.79×  (T=50, W=5, N=2)"
    panel.set_request(
        GenerationRequest(model="tiny-cogvideox", steps=50, strategy="sequential", devices="cpu:1")
    )
    assert picker.speedup_label.text() == "ideal speedup 1.00×"
    assert not picker.cpu_workers.isEnabled()  # one device only
    panel.set_request(
        GenerationRequest(
            model="tiny-cogvideox",
            steps=50,
            strategy="batchstep",
            strategy_options={"warmup": 5, "lookahead": 2},
            devices="cpu:1",
        )
    )
    assert picker.speedup_label.text() == "ideal speedup 1.79×  (T=50, W=5, P=2)"
    # Warm-up on auto: the model family's published warm-up, scaled to the step count.
    picker.set_value("parastep", {}, "cpu:2")
    assert picker.speedup_label.text() == "ideal speedup 1.56×  (T=50, W=13, N=2)"


def test_gpu_checkboxes(qtbot, gpu_catalog):
    panel = RequestPanel()
    qtbot.addWidget(panel)
    panel.set_catalog(gpu_catalog)
    picker = panel.strategy_picker
    assert [b.text() for b in picker.gpu_checks] == ["GPU 0", "GPU 1", "GPU 2", "GPU 3"]
    assert not picker.cpu_workers.isVisibleTo(panel)
    panel.set_request(GenerationRequest(model="tiny-cogvideox", strategy="parastep", devices="cuda:1,3"))
    assert panel.request().devices == "cuda:1,3"
    picker.gpu_checks[0].setChecked(True)
    assert panel.request().devices == "cuda:0,1,3"
    # A one-device strategy keeps one GPU.
    picker.strategy_box.setCurrentIndex(picker.strategy_box.findData("sequential"))
    assert panel.request().devices == "cuda:0"


def test_strategies_a_model_cannot_run_are_greyed_out_with_the_reason(qtbot, catalog):
    catalog = dict(catalog)
    halves = {
        "name": "halves",
        "description": "guidance halves on two devices",
        "min_devices": 2,
        "max_devices": 2,
        "options": [
            {"name": "fresh", "help": "on/off", "default": 0, "minimum": 0, "maximum": 1},
            {"name": "portion", "help": "percent", "default": 50, "minimum": 1, "maximum": 100},
        ],
        "ideal": {"width_from": "", "factor": 2, "rounds": False},
        "unavailable": {"tiny-svd": "its UNet has no guidance halves"},
    }
    catalog["strategies"] = [*catalog["strategies"], halves]
    panel = RequestPanel()
    qtbot.addWidget(panel)
    panel.set_catalog(catalog)
    picker = panel.strategy_picker
    panel.select_model("tiny-cogvideox")
    picker.set_value("halves", {}, "cpu:2")
    assert picker.strategy() == "halves"
    assert picker.speedup_label.text() == "ideal speedup 2.00×"  # factor 2, no rounds
    fresh, portion = picker._option_boxes["fresh"], picker._option_boxes["portion"]
    assert isinstance(fresh, QCheckBox) and not fresh.isChecked()  # a 0..1 option is a switch
    fresh.setChecked(True)
    portion.setValue(250)  # clamped to the option's maximum
    assert picker.options() == {"fresh": 1, "portion": 100}
    panel.select_model("tiny-svd")
    index = picker.strategy_box.findData("halves")
    assert not picker.strategy_box.model().item(index).isEnabled()
    tip = picker.strategy_box.itemData(index, Qt.ItemDataRole.ToolTipRole)
    assert "its UNet has no guidance halves" in tip
    assert picker.strategy() == "sequential"  # moved off the strategy it cannot run
    panel.select_model("tiny-cogvideox")
    assert picker.strategy_box.model().item(index).isEnabled()


def test_window_ideal_speedup_equals_the_engines_for_every_strategy():
    """The window computes the ideal speedup from each strategy's described data (it cannot import the
    engine); for every strategy, device count and warm-up / stride / lookahead it must agree."""
    from engine.strategies import STRATEGIES
    from ui.model_info import strategy_ideal_speedup

    for cls in STRATEGIES.values():
        described = cls.describe()
        names = {o["name"] for o in described["options"]}
        for ranks in (1, 2, 3, 4, 6):
            for warmup in (0, 3):
                for extra in (1, 2):
                    options = {"warmup": warmup} if "warmup" in names else {}
                    options.update({n: extra for n in ("stride", "lookahead") if n in names})
                    if extra > ranks and "stride" in names:
                        continue
                    engine_value = cls.ideal_speedup(20, options, ranks)
                    window_value = strategy_ideal_speedup(described, 20, warmup, options, ranks)
                    assert window_value == pytest.approx(engine_value), (cls.name, ranks, options)


def test_lora_list_edits_the_requests_adapters(panel, qtbot):
    """Add, weigh and remove LoRA adapters: the request carries them, every edit is a change."""
    changes: list[int] = []
    panel.changed.connect(lambda: changes.append(1))
    loras = panel.lora_list
    loras.add("/loras/style.safetensors")
    loras.add("/loras/detail.safetensors", 0.5)
    assert panel.request().loras == [
        {"path": "/loras/style.safetensors", "weight": 1.0},
        {"path": "/loras/detail.safetensors", "weight": 0.5},
    ]
    loras.rows[0].slider.setValue(75)  # hundredths
    assert loras.rows[0].value_label.text() == "0.75"
    qtbot.mouseClick(loras.rows[1].remove_button, Qt.MouseButton.LeftButton)
    assert panel.request().loras == [{"path": "/loras/style.safetensors", "weight": 0.75}]
    assert len(changes) == 4  # two adds, the slider, the removal
    panel.set_request(dataclasses.replace(panel.request(), loras=[]))
    assert panel.request().loras == [] and not loras.rows

import pytest

from engine.devices import cpu_cores, format_devices, inventory, parse_devices
from engine.errors import UserError


def test_cpu_specs():
    assert parse_devices("cpu:2") == ["cpu", "cpu"]
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("auto", wanted=1) == (["cuda:0"] if inventory()[0].kind == "cuda" else ["cpu"])
    assert format_devices(["cpu", "cpu", "cpu"]) == "cpu:3"


@pytest.mark.parametrize("spec", ["cpu:0", "cpu:x", f"cpu:{cpu_cores() * 4 + 1}", "cuda:7", "tpu", "cuda:a"])
def test_bad_specs_name_the_problem_and_the_fix(spec):
    with pytest.raises(UserError) as info:
        parse_devices(spec)
    assert info.value.fix


def test_inventory_lists_the_cpu():
    cpu = [d for d in inventory() if d.kind == "cpu"]
    assert len(cpu) == 1 and cpu[0].memory_total and cpu[0].memory_total > 0

"""Semantic evaluation of the embedded ``tones`` model: every prompt of its grammar, several seeds, through
the real engine (sequential on cpu:1), with pass rates per attribute written to the "tones" section of
docs/models.md.

    nice -n 19 .venv/bin/python -m scripts.evaluate_tones [--seeds 3] [--model tones] [--no-write]

Attributes (resources/tones_data.check): ``pitch`` (the spectral peak within 3% of the asked pitch: tones,
notes and beeps), ``chord`` (each of the three notes within 3% of one of the three strongest peaks),
``direction`` (the sweep's per-frame peak frequency rises or falls as asked), ``noise`` (a flat spectrum),
``count`` (the number of beeps). "Chance" checks each clip against the other prompts of its kind (e.g. a
440 Hz clip against the 220, 330, ... prompts): what passing is worth for a model that ignores the words.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

from resources import tones_data as td

REPO = Path(__file__).resolve().parents[1]

SECTION = "## tones"


def evaluate(model: str, seeds: int, steps: int | None) -> dict:
    from engine.engine import Engine
    from engine.protocol import GenerationRequest

    sounds = td.grammar()
    passed, chance = defaultdict(list), defaultdict(list)
    rows, seconds = [], []
    with Engine() as engine:
        for sound in sounds:
            for seed in range(seeds):
                request = GenerationRequest(
                    model=model, prompt=sound.prompt, seed=seed, steps=steps, devices="cpu:1"
                )
                plan = engine.plan(request)
                start = time.perf_counter()
                result = engine.run(plan, previews=False)
                seconds.append(time.perf_counter() - start)
                audio, rate = result.output, int(result.rate)
                checks = td.check(sound, audio, rate)
                for name, ok in checks.items():
                    passed[name].append(ok)
                others = [s for s in sounds if s.kind == sound.kind and s != sound]
                for other in others:
                    for name, ok in td.check(other, audio, rate).items():
                        chance[name].append(ok)
                peak = td.spectral_peak_hz(audio, rate)
                rows.append((sound, seed, checks, peak, td.sweep_slope(audio, rate)))
                print(f"{sound.prompt!r} seed {seed}: {checks} peak {peak:.1f} Hz", flush=True)
    return {
        "plan": plan,
        "passed": passed,
        "chance": chance,
        "rows": rows,
        "seconds": seconds,
    }


def _rate(values: list[bool]) -> str:
    return f"{100 * sum(values) / len(values):.0f}% ({sum(values)}/{len(values)})" if values else "-"


def report(results: dict, seeds: int, command: str) -> str:
    plan = results["plan"].request
    median = sorted(results["seconds"])[len(results["seconds"]) // 2]
    lines = [
        f"`resources/models/tones`: AudioLDM2 architecture ({td.SAMPLE_RATE} Hz, {td.N_MELS} mel bins, "
        f"{td.HOP}-sample hop), trained by `scripts/train_tones.py` on the synthetic sounds of "
        "`resources/tones_data.py` (training above).",
        "",
        f"Semantic pass rates over the whole grammar ({len(td.grammar())} prompts x {seeds} seeds = "
        f"{len(results['rows'])} clips) through the engine, sequential on cpu:1, {plan.steps} steps, "
        f"guidance {plan.guidance_scale}, {plan.seconds} s. Measured with `{command}` on a 2-core AMD EPYC "
        f"VM shared with other agents (Python {platform.python_version()}); "
        f"{sum(results['seconds']) / 60:.1f} min in all, median {median:.2f} s per clip.",
        "",
        "| attribute | what is checked | pass rate | chance (other prompts of the kind) |",
        "| --- | --- | --- | --- |",
    ]
    meaning = {
        "pitch": "spectral peak within 3% of the asked pitch (tones, notes, beeps)",
        "chord": "each chord note within 3% of one of the 3 strongest peaks",
        "direction": "sweep rises / falls as asked (slope of the per-frame peak frequency)",
        "noise": "spectral flatness > 0.1",
        "count": "number of beeps (onsets of the RMS envelope)",
    }
    for name, values in results["passed"].items():
        lines.append(
            f"| {name} | {meaning.get(name, '')} | {_rate(values)} | {_rate(results['chance'][name])} |"
        )
    by_kind = defaultdict(list)
    for sound, _, checks, _, _ in results["rows"]:
        by_kind[sound.kind].append(all(checks.values()))
    lines += [
        "",
        "All attributes of a clip at once, by kind: "
        + ", ".join(f"{kind} {_rate(values)}" for kind, values in by_kind.items())
        + ".",
        "",
    ]
    failures = [row for row in results["rows"] if not all(row[2].values())]
    if failures:
        lines.append("Failures (prompt, seed, measured peak, sweep slope in octaves/s):")
        lines.append("")
        for sound, seed, _, peak, slope in failures[:40]:
            wanted = f", asked {sound.pitches[0]:.1f} Hz" if sound.pitches else ""
            lines.append(f"- `{sound.prompt}` seed {seed}: peak {peak:.1f} Hz{wanted}, slope {slope:+.2f}")
        lines.append("")
    return "\n".join(lines)


BEGIN, END = (
    "<!-- tones evaluation: begin (written by scripts/evaluate_tones.py) -->",
    "<!-- tones evaluation: end -->",
)


def write_section(path: Path, text: str) -> None:
    """Put `text` between the evaluation markers of the tones section of `path` (adding the section or the
    markers when absent), leaving everything else, other sections included, as it is."""
    content = path.read_text() if path.exists() else "# Embedded models\n"
    block = f"{BEGIN}\n{text.strip()}\n{END}"
    if BEGIN in content and END in content:
        content = content[: content.index(BEGIN)] + block + content[content.index(END) + len(END) :]
    elif SECTION + "\n" in content:
        start = content.index(SECTION + "\n")
        end = content.find("\n## ", start)
        end = len(content) if end < 0 else end + 1
        content = (
            content[:end].rstrip("\n")
            + "\n\n"
            + block
            + "\n"
            + ("\n" + content[end:] if end < len(content) else "")
        )
    else:
        content = content.rstrip("\n") + "\n\n" + SECTION + "\n\n" + block + "\n"
    path.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tones")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "models.md")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    args = parser.parse_args()
    results = evaluate(args.model, args.seeds, args.steps)
    command = "python -m scripts.evaluate_tones" + "".join(
        f" {arg}" for arg in sys.argv[1:] if not arg.startswith("--no-write")
    )
    text = report(results, args.seeds, command.strip())
    print(text)
    if not args.no_write:
        write_section(args.out, text)


if __name__ == "__main__":
    main()

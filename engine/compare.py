"""The comparison lab, headless: one request under several strategy@devices entries, same seed.

The first `sequential` run is the reference for speedup and fidelity.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from engine.engine import Engine, EventSink, clip_stem
from engine.errors import UserError
from engine.protocol import GenerationRequest

COUNTER_FIELDS = ("denoiser_calls", "compute_s", "comm_wait_s", "bytes_sent", "bytes_received")


def parse_strategy_specs(text: str, default_devices: str) -> list[tuple[str, str]]:
    """'sequential@cpu:1,parastep@cuda:0,1' -> [(strategy, devices), ...].

    A comma is both the list separator and the GPU separator, so a bare number continues the
    previous entry's GPU list.
    """
    entries: list[list[str]] = []
    for token in (part.strip() for part in text.split(",")):
        if not token:
            continue
        if token.isdigit() and entries and entries[-1][1].startswith("cuda"):
            entries[-1][1] += f",{token}"
            continue
        name, _, devices = token.partition("@")
        entries.append([name.strip(), devices.strip() or default_devices])
    if not entries:
        raise UserError(
            "--strategies names no strategy.", "Write e.g. --strategies sequential,parastep@cpu:2."
        )
    return [(name, devices) for name, devices in entries]


def entry_request(
    request: GenerationRequest, name: str, devices: str, own: dict[str, Any] | None = None
) -> GenerationRequest:
    """The request one comparison entry runs: the request's options that the strategy takes, then
    the entry's own (the engine's `check` plans exactly this)."""
    options = {k: v for k, v in request.strategy_options.items() if _accepts(name, k)}
    options.update(own or {})
    return dataclasses.replace(request, strategy=name, devices=devices, strategy_options=options)


def compare(
    engine: Engine,
    request: GenerationRequest,
    specs: list[tuple[str, str]] | list[tuple[str, str, dict[str, Any]]],
    on_event: EventSink | None = None,
    save: bool = True,
    previews: bool = False,
) -> dict[str, Any]:
    """Runs every entry; returns {"rows": [...]} as the CLI prints it.

    An entry is (strategy, devices) or (strategy, devices, options): its own options (e.g. a
    ParaStep variant) override the request's, so one strategy can appear with several settings.
    """
    from engine.metrics import fidelity, relative_l2
    from engine.outputs import plan_output

    plans = []
    for name, devices, *own in specs:  # validate everything before running anything
        plans.append(engine.plan(entry_request(request, name, devices, own[0] if own else None)))
    # The reference (first sequential entry) runs first, so every row can be compared with it.
    first_sequential = next((i for i, p in enumerate(plans) if p.request.strategy == "sequential"), None)
    order = list(range(len(plans)))
    if first_sequential is not None:
        order.insert(0, order.pop(first_sequential))
    rows: list[dict[str, Any]] = [{} for _ in plans]
    reference = None
    for index in order:
        plan = plans[index]
        result = engine.run(
            plan, on_event, previews=previews
        )  # off by default: rank 0 draws them in the loop
        if index == first_sequential:
            reference = result
        row: dict[str, Any] = {
            "strategy": plan.request.strategy,
            "strategy_options": plan.request.strategy_options,
            "devices": plan.request.devices,
            "denoise_s": result.timings["denoise_s"],
            "total_s": result.timings["total_s"],
            "ideal_speedup": plan.ideal_speedup,
            "speedup": None,
            "fidelity": None,
        }
        if reference is not None:
            row["speedup"] = reference.timings["denoise_s"] / result.timings["denoise_s"]
            row["fidelity"] = fidelity(plan.adapter.modality, result.output, reference.output)
            if result.latents is not None and reference.latents is not None:
                row["fidelity"]["latent_rel_l2"] = relative_l2(result.latents, reference.latents)
                row["fidelity"]["identical"] = bool(
                    row["fidelity"]["identical"] and np.array_equal(result.latents, reference.latents)
                )
        for field in COUNTER_FIELDS:
            row[field] = sum(rank[field] for rank in result.ranks)
        row["ranks"] = result.ranks
        if save:
            path = plan_output(request.output, plan.adapter.modality, clip_stem(plan.request))
            row["output"] = engine.save(result, path)["output"]
        else:
            result.discard_pending()
        rows[index] = row
    return {"rows": rows, "reference": "sequential" if reference is not None else None}


def _accepts(strategy: str, option: str) -> bool:
    from engine.strategies import strategy_class

    return any(o.name == option for o in strategy_class(strategy).options)

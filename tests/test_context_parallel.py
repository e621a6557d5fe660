"""context-parallel (diffusers' enable_parallelism): the refusals, and the install/uninstall mechanics.

The embedded models declare no context-parallel plan, and diffusers' enable_parallelism needs an
accelerator, so the engine refuses both at plan time. The mechanics are checked on two gloo
processes with a tiny random Wan transformer (which has a plan) and the accelerator count patched
to 1: the only change that lets diffusers' code run on CPU.
"""

from __future__ import annotations

import json
import multiprocessing
from types import SimpleNamespace

import pytest

from engine.errors import UserError
from engine.protocol import GenerationRequest
from engine.strategies.context_parallel import ContextParallelStrategy

WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=32,
)


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-svd", "tiny-audioldm2"])
def test_models_without_a_plan_are_refused_at_plan_time(model, shared_engine):
    with pytest.raises(UserError, match=r"no context-parallel plan \(_cp_plan\)"):
        shared_engine.plan(
            GenerationRequest(model=model, prompt="x", strategy="context-parallel", devices="cpu:2")
        )


def test_cpu_workers_are_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel"})
    )
    assert ContextParallelStrategy.unavailable_reason(SimpleNamespace(path=tmp_path)) is None
    request = GenerationRequest(model=str(tmp_path), devices="cpu:2", strategy_options={"ring": 0})
    with pytest.raises(UserError, match="accelerator"):
        ContextParallelStrategy.check_request(request, None, 2)


def _rank_main(rank: int, world: int, store: str, results: multiprocessing.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.accelerator.device_count = lambda: 1  # diffusers puts rank r on device r % count
        from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        from engine.strategies.base import JobContext

        torch.manual_seed(0)
        model = WanTransformer3DModel(**WAN_CONFIG).eval()
        torch.manual_seed(1)
        inputs = (torch.randn(2, 4, 3, 8, 8), torch.tensor([500, 500]), torch.randn(2, 6, 32))
        pipe = SimpleNamespace(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())

        def strategy(ring: int) -> ContextParallelStrategy:
            ctx = JobContext(rank, world, torch.device("cpu"), total_steps=1, options={"ring": ring})
            return ContextParallelStrategy(ctx)

        with torch.no_grad():
            alone = model(*inputs, return_dict=False)[0]
            differences = []
            for _job in range(2):  # a warm model takes a second job: uninstall undid everything
                ulysses = strategy(ring=0)
                ulysses.install(pipe)
                try:
                    split = model(*inputs, return_dict=False)[0]
                finally:
                    ulysses.uninstall()
                differences.append(float((split - alone).abs().max() / alone.abs().max()))
            hooked = [
                n
                for n, m in model.named_modules()
                if getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
            ]
            try:
                strategy(ring=1).install(pipe)
                ring_refusal = None
            except UserError as exc:
                ring_refusal = str(exc)
            results.put(
                (
                    rank,
                    differences,
                    hooked,
                    model._parallel_config,
                    ulysses.counters.denoiser_calls,
                    ring_refusal,
                )
            )
    except Exception as exc:  # reported to the test, which fails with it
        results.put((rank, repr(exc), None, None, None, None))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_split_attention_equals_the_whole_model_and_uninstall_restores_it(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store = str(tmp_path / "store")
    processes = [context.Process(target=_rank_main, args=(rank, 2, store, results)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        reports = sorted(results.get(timeout=240) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
    for rank, differences, hooked, parallel_config, calls, ring_refusal in reports:
        assert isinstance(differences, list), f"rank {rank}: {differences}"
        assert max(differences) <= 1e-5, f"rank {rank}: relative max difference {differences}"
        assert hooked == [] and parallel_config is None
        assert calls == 1
        assert ring_refusal is not None and "log-sum-exp" in ring_refusal  # float32 on CPU

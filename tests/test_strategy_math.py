"""Closed forms the strategies and the benchmarks rely on."""

import pytest

from engine.compare import parse_strategy_specs
from engine.strategies import ideal_speedup
from engine.strategies.parastep import expected_traffic


@pytest.mark.parametrize(("n", "expected"), [(1, 1.0), (2, 1.79), (4, 2.94), (8, 4.55)])
def test_ideal_speedup_matches_published_bound(n, expected):
    assert ideal_speedup(50, 5, n) == pytest.approx(expected, abs=0.005)


def test_traffic_formula_two_ranks():
    # T=10, W=2, N=2: rounds (2,2) (4,2) (6,2) (8,2); rank 1 sends 4 predictions.
    t = expected_traffic(10, 2, 2, prediction_bytes=100, latent_bytes=40)
    flags = 2 + 3  # after each warm-up step, after every round but the last
    assert t[1]["bytes_sent"] == 4 * 100
    assert t[0]["bytes_received"] == 4 * 100
    assert t[0]["bytes_sent"] == flags * 1 + 3 * 40
    assert t[1]["bytes_received"] == t[0]["bytes_sent"]


def test_traffic_formula_partial_last_round():
    # T=9, W=2, N=3: rounds (2,3) (5,3) (8,1): rank 2 sends twice, rank 1 twice; last round none.
    t = expected_traffic(9, 2, 3, prediction_bytes=10, latent_bytes=7)
    assert [r["bytes_sent"] for r in t[1:]] == [20, 20]
    assert t[0]["bytes_received"] == 40
    assert t[0]["bytes_sent"] == 2 * ((2 + 2) * 1 + 2 * 7)


def test_single_rank_sends_nothing():
    assert expected_traffic(50, 5, 1, 10, 10) == [{"bytes_sent": 0, "bytes_received": 0}]


def test_strategy_specs_keep_gpu_lists_together():
    specs = parse_strategy_specs("sequential@cuda:0,parastep@cuda:0,1,batchstep", "cpu:1")
    assert specs == [("sequential", "cuda:0"), ("parastep", "cuda:0,1"), ("batchstep", "cpu:1")]


def test_installed_step_keeps_the_scheduler_signature():
    """Pipelines pass eta/generator only when scheduler.step's signature shows them."""
    import inspect

    import torch
    from diffusers import DDIMScheduler

    from engine.strategies.base import JobContext, Strategy

    class Pipe:
        unet = torch.nn.Linear(1, 1)
        scheduler = DDIMScheduler()

    pipe = Pipe()
    strategy = Strategy(
        JobContext(rank=0, world_size=1, device=torch.device("cpu"), total_steps=1, options={})
    )
    strategy.install(pipe)
    assert {"eta", "generator"} <= set(inspect.signature(pipe.scheduler.step).parameters)
    strategy.uninstall()
    assert "step" not in vars(pipe.scheduler)


def test_calls_per_step_are_keyed_and_a_changing_layout_is_refused():
    """Loops with several denoiser calls per step (separate guidance passes) run under step-parallel
    strategies; strategies that split the denoiser itself refuse them, and a loop whose number of
    calls changes from step to step is refused by the strategies that key on it."""
    import torch
    from diffusers import DDIMScheduler

    from engine.errors import UserError
    from engine.strategies import STRATEGIES
    from engine.strategies.base import JobContext, Strategy

    def run(strategy_cls: type, calls: list[int]) -> list[int]:
        class Pipe:
            unet = torch.nn.Linear(2, 2)
            scheduler = DDIMScheduler()

        pipe = Pipe()
        pipe.scheduler.set_timesteps(len(calls))
        ctx = JobContext(
            rank=0, world_size=1, device=torch.device("cpu"), total_steps=len(calls), options={"warmup": 1}
        )
        strategy = strategy_cls(ctx)
        seen = []
        strategy.install(pipe)
        try:
            x = torch.zeros(1, 2)
            for step, count in enumerate(calls):
                for _ in range(count):
                    pipe.unet(x)
                    seen.append(strategy.call)
                pipe.scheduler.step(torch.zeros(1, 2), pipe.scheduler.timesteps[step], x)
        finally:
            strategy.uninstall()
        return seen

    # The call index counts within a step and starts again after scheduler.step.
    assert run(STRATEGIES["parastep"], [2, 2, 2]) == [1, 2, 1, 2, 1, 2]
    assert run(STRATEGIES["sequential"], [2, 3, 1]) == [1, 2, 1, 2, 3, 1]  # the loop is untouched
    with pytest.raises(UserError, match="same calls at every step"):
        run(STRATEGIES["parastep"], [2, 3])
    with pytest.raises(UserError, match="same calls at every step"):
        run(STRATEGIES["parastep"], [2, 1])

    class SplitsTheDenoiser(Strategy):
        name = "splitter"
        one_call_per_step = True

    with pytest.raises(UserError, match="more than once per step"):
        run(SplitsTheDenoiser, [2])
    # Exactly the strategies that cut the denoiser into parts or bands need one call a step.
    assert {n for n, cls in STRATEGIES.items() if cls.one_call_per_step} == {
        "asyncdiff",
        "distrifusion",
        "pcpp",
    }


def test_a_pipeline_that_trims_its_schedule_is_refused_by_step_parallel_strategies():
    """An img2img-like loop running fewer steps than asked would desynchronise the rounds."""
    import torch
    from diffusers import DDIMScheduler

    from engine.errors import UserError
    from engine.strategies import STRATEGIES
    from engine.strategies.base import JobContext

    def run(strategy_name: str, loop_steps: int) -> None:
        class Pipe:
            unet = torch.nn.Linear(2, 2)
            scheduler = DDIMScheduler()

        pipe = Pipe()
        pipe.scheduler.set_timesteps(loop_steps)
        ctx = JobContext(
            rank=0, world_size=1, device=torch.device("cpu"), total_steps=4, options={"warmup": 1}, pipe=pipe
        )
        strategy = STRATEGIES[strategy_name](ctx)
        strategy.install(pipe)
        try:
            pipe.unet(torch.zeros(1, 2))
        finally:
            strategy.uninstall()

    run("parastep", 4)
    run("sequential", 3)  # the stock loop does what the pipeline does
    with pytest.raises(UserError, match="runs 3 steps where 4 were asked"):
        run("parastep", 3)


def test_flow_matching_steps_get_an_x0_estimate_for_previews():
    """FlowMatch and UniPC-on-flow-sigmas steps carry no pred_original_sample; the strategies derive
    it (x0 = x_t - sigma v). For Euler's last step (to sigma 0) it is exactly the step's output."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.strategies.base import JobContext, Strategy

    class Pipe:
        unet = torch.nn.Identity()
        scheduler = FlowMatchEulerDiscreteScheduler()

    pipe = Pipe()
    pipe.scheduler.set_timesteps(3)
    reports = []
    ctx = JobContext(rank=0, world_size=1, device=torch.device("cpu"), total_steps=3, options={})
    ctx.on_step = reports.append
    strategy = Strategy(ctx)
    strategy.install(pipe)
    try:
        x = torch.randn(1, 4, 2, 2)
        for t in pipe.scheduler.timesteps:
            v = pipe.unet(torch.randn_like(x))
            x = pipe.scheduler.step(v, t, x).prev_sample
    finally:
        strategy.uninstall()
    assert all(r.pred_original_sample is not None for r in reports)
    assert torch.allclose(reports[-1].pred_original_sample, x, atol=1e-6)
    assert not torch.allclose(reports[0].pred_original_sample, x, atol=1e-3)

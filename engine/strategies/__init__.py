"""Strategy registry: the CLI and the window list what is here; new strategies appear by being added."""

from engine.errors import UserError
from engine.strategies.asyncdiff import AsyncDiffStrategy
from engine.strategies.base import Strategy, StrategyOption, ideal_speedup
from engine.strategies.batchstep import BatchStepStrategy
from engine.strategies.caches import CACHE_STRATEGIES
from engine.strategies.cfg_parallel import CfgParallelStrategy
from engine.strategies.cfg_parastep import CfgParaStepStrategy
from engine.strategies.context_parallel import ContextParallelStrategy
from engine.strategies.distrifusion import DistriFusionStrategy
from engine.strategies.parastep import ParaStepStrategy
from engine.strategies.pcpp import PCPPStrategy
from engine.strategies.sequential import SequentialStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        SequentialStrategy,
        ParaStepStrategy,
        BatchStepStrategy,
        AsyncDiffStrategy,
        DistriFusionStrategy,
        PCPPStrategy,
        CfgParallelStrategy,
        CfgParaStepStrategy,
        *CACHE_STRATEGIES,
        ContextParallelStrategy,
    )
}


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UserError(
            f"Unknown strategy '{name}'.", f"Choose one of: {', '.join(sorted(STRATEGIES))}."
        ) from None


__all__ = ["STRATEGIES", "Strategy", "StrategyOption", "ideal_speedup", "strategy_class"]

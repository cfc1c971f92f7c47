"""Token strategies: pruning, ToMe merging, prune-then-merge and PPT, as per-block plans
that the meta-network's engine executes."""

from prance.tokens.state import TokenOp, TokenPlan, TokenState
from prance.tokens.strategies import STRATEGIES, StrategyConfig, build_plan, check_strategy

__all__ = ["TokenOp", "TokenPlan", "TokenState", "STRATEGIES", "StrategyConfig", "build_plan", "check_strategy"]

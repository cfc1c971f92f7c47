"""The weight-sharing meta-network: a timm VisionTransformer whose every forward can
run any sub-network of it, with any token plan."""

from __future__ import annotations

from torch import Tensor, nn

from prance.models import engine
from prance.models.arch import ArchSpec, arch_of
from prance.models.subnet import SubNet, SubnetSpace
from prance.tokens.state import TokenPlan, TokenState


class MetaViT(nn.Module):
    """Wraps a timm ``VisionTransformer`` (kept as ``self.vit``, so its state dict is the
    timm one under the ``vit.`` prefix) and runs sub-networks by slicing its weights.

    ``forward(images)`` with no sub-network and no plan equals the timm model's forward.
    """

    def __init__(self, vit: nn.Module, space: SubnetSpace | None = None):
        super().__init__()
        self.arch: ArchSpec = arch_of(vit)
        self.vit = vit
        self.space = space or SubnetSpace.default(self.arch)
        self._full = SubNet.full(self.arch)
        self._dense = TokenPlan.dense(self.arch.depth)

    @property
    def full_subnet(self) -> SubNet:
        return self._full

    def check_subnet(self, subnet: SubNet | None) -> SubNet:
        return self._full if subnet is None else subnet.check(self.arch)

    def check_plan(self, plan: TokenPlan | None) -> TokenPlan:
        if plan is None:
            return self._dense
        if len(plan.ops) != self.arch.depth:
            raise ValueError(f"token plan has {len(plan.ops)} blocks, the model has {self.arch.depth}")
        return plan

    def forward(
        self,
        images: Tensor,
        subnet: SubNet | None = None,
        plan: TokenPlan | None = None,
        stats: dict | None = None,
    ) -> Tensor:
        return engine.forward(self.vit, images, self.check_subnet(subnet), self.check_plan(plan), stats)

    # Stage-wise execution, for controllers that decide between blocks.
    def embed(self, images: Tensor, subnet: SubNet | None = None, stats: dict | None = None) -> TokenState:
        subnet = self.check_subnet(subnet)
        return TokenState(engine.embed(self.vit, images, subnet.embed[0]), None, self.arch.num_prefix_tokens, stats=stats)

    def run_blocks(
        self, state: TokenState, subnet: SubNet | None, plan: TokenPlan | None, start: int, stop: int
    ) -> TokenState:
        return engine.run_blocks(self.vit, state, self.check_subnet(subnet), self.check_plan(plan), start, stop)

    def head(self, state: TokenState) -> Tensor:
        return engine.head(self.vit, state)

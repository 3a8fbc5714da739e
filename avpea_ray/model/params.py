"""Parameter report: adapter, head, frozen-backbone and trainable counts, PEFT's line, and
the paper's counts beside them."""
from __future__ import annotations

from dataclasses import dataclass


from .task_model import AVPEAModel

# The paper's trainable counts (adapters, adapters + head), by task and backbone (timm name
# without its pretrained tag), at its settings: r = 8, adapters in both streams.
PAPER_COUNTS: dict[tuple[str, str], tuple[str, float, float]] = {
    ("avel", "vit_base_patch16_224"): ("Table 1", 3.7e6, 17.8e6),
    ("avel", "vit_large_patch16_224"): ("Table 1", 12.9e6, 27.2e6),
}


@dataclass(frozen=True)
class ParameterCounts:
    adapter: int
    head: int
    backbone: int
    num_adapters: int

    @property
    def trainable(self) -> int:
        return self.adapter + self.head

    @property
    def total(self) -> int:
        return self.trainable + self.backbone


def count_parameters(model: AVPEAModel) -> ParameterCounts:
    """Count a model's parameters by owner (BatchNorm running statistics are buffers, not
    parameters, as in the paper's counts)."""
    trainable = dict(model.trainable_named_parameters())
    adapter = sum(p.numel() for n, p in trainable.items() if n.startswith("trunk."))
    head = sum(p.numel() for n, p in trainable.items() if n.startswith("head."))
    backbone = sum(p.numel() for p in model.trunk.backbone.parameters())
    num_adapters = len(model.trunk.adapters_visual) + len(model.trunk.adapters_audio)
    return ParameterCounts(adapter, head, backbone, num_adapters)


def format_report(model: AVPEAModel, counts: ParameterCounts) -> str:
    """The lines `python -m avpea_ray params` prints."""
    cfg = model.config
    per_adapter = counts.adapter // counts.num_adapters if counts.num_adapters else 0
    return "\n".join([
        f"model: {cfg.backbone} (depth {model.trunk.depth}, width {model.trunk.dim}), "
        f"AV-PEA r={cfg.reduction_factor}, adapters={cfg.adapters}, "
        f"cross-attention {'on' if cfg.cross_attention else 'off'}, gating={cfg.gating}, "
        f"task={model.task}",
        f"adapter params: {counts.adapter:,} ({counts.adapter / 1e6:.1f}M; "
        f"{counts.num_adapters} adapters x {per_adapter:,})",
        f"head params ({model.task}): {counts.head:,} ({counts.head / 1e6:.1f}M)",
        f"frozen backbone params: {counts.backbone:,} ({counts.backbone / 1e6:.1f}M)",
        f"trainable (adapters + head): {counts.trainable:,}",
        f"trainable params: {counts.trainable:,} || all params: {counts.total:,} || "
        f"trainable%: {100 * counts.trainable / counts.total:.4f}",
        *_paper_lines(model, counts),
    ])


def _paper_lines(model: AVPEAModel, counts: ParameterCounts) -> list[str]:
    """The paper's counts for this task and backbone beside this model's, and the head as its
    reference code counts it where that code allocates parameters it never uses."""
    lines = []
    paper = PAPER_COUNTS.get((model.task, model.config.backbone.split(".")[0]))
    if paper:
        table, adapter, trainable = paper
        lines.append(f"paper ({table}): trainable {trainable / 1e6:.1f}M = adapters {adapter / 1e6:.1f}M "
                     f"+ head {(trainable - adapter) / 1e6:.1f}M; this model: trainable "
                     f"{counts.trainable / 1e6:.1f}M = adapters {counts.adapter / 1e6:.1f}M "
                     f"+ head {counts.head / 1e6:.1f}M")
    unused = getattr(model.head, "reference_unused_parameters", 0)
    if unused:
        head, trainable = counts.head + unused, counts.trainable + unused
        lines.append(f"counted as the head's reference code counts (+{unused:,} parameters it allocates "
                     f"and never uses): head {head:,} ({head / 1e6:.1f}M), trainable {trainable:,} "
                     f"({trainable / 1e6:.1f}M)")
    return lines

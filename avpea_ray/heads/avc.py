"""AVC head: a caption decoder that cross-attends to the AV-PEA token sequences.

Memory: for each time step, the visual and audio CLS tokens and each stream's patch tokens
average-pooled into `memory_patches` groups, projected to the decoder's width, plus learned
time-step and token-type embeddings: `T * 2 * (1 + memory_patches)` memory tokens per clip.

Decoder: a pre-norm Transformer decoder (causal self-attention over the caption, cross-attention
into the memory) with tied input/output token embeddings. Training is teacher-forced
cross-entropy; `generate` decodes greedily (`beam_size=1`) or with beam search, both through
one code path. Token ids follow the tokenizer: `bos_id` ([CLS]) starts a caption, `eos_id`
([SEP]) ends it, `pad_id` pads.

Like AVQA's questions, a clip may come with several captions: `caption_video_index` says
which clip each caption describes, so the backbone runs once per clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AVCHead(nn.Module):
    """Caption decoder over audio-visual memory tokens.

    Args:
        dim: the trunk's width.
        vocab_size: the tokenizer's size.
        bos_id, eos_id, pad_id: the tokenizer's start, end and padding ids.
        hidden: decoder width.
        layers: decoder layers.
        num_heads: attention heads.
        max_length: longest caption in tokens, start and end included.
        memory_patches: pooled patch tokens per stream and time step.
        max_steps: most time steps a clip may have (size of the time-step embedding).
        dropout: decoder dropout.
        text_model: the tokenizer's name (recorded so saved heads name their tokenizer; the
            decoder itself is trained from scratch).
    """

    def __init__(self, dim: int, vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                 hidden: int = 256, layers: int = 2, num_heads: int = 4, max_length: int = 32,
                 memory_patches: int = 1, max_steps: int = 64, dropout: float = 0.1,
                 text_model: str = "random") -> None:
        super().__init__()
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_length, self.memory_patches = max_length, memory_patches
        self.memory_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))
        # Types: visual CLS, audio CLS, visual patch groups, audio patch groups.
        self.type_embed = nn.Embedding(4, hidden)
        self.step_embed = nn.Embedding(max_steps, hidden)
        self.token_embed = nn.Embedding(vocab_size, hidden, padding_idx=pad_id)
        self.position_embed = nn.Embedding(max_length, hidden)
        layer = nn.TransformerDecoderLayer(hidden, num_heads, 4 * hidden, dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out_norm = nn.LayerNorm(hidden)
        # The output projection is the token embedding: at nn.Embedding's N(0, 1) the initial
        # logits have std sqrt(hidden) and the first steps only undo that (loss ~60, not ~ln V).
        for embedding in (self.token_embed, self.position_embed, self.step_embed, self.type_embed):
            nn.init.normal_(embedding.weight, std=0.02)
        with torch.no_grad():
            self.token_embed.weight[pad_id].zero_()  # as nn.Embedding leaves its padding row

    # -- pieces --------------------------------------------------------------------------
    def memory(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """`(B, T, N+1, D)` visual and `(B, T, M+1, D)` audio tokens -> `(B, S, hidden)`."""
        batch, steps = visual.shape[:2]
        groups = self.memory_patches

        def pooled(tokens: torch.Tensor) -> torch.Tensor:  # (B, T, P, D) -> (B, T, groups, D)
            flat = tokens.flatten(0, 1).transpose(1, 2)    # (B*T, D, P)
            return F.adaptive_avg_pool1d(flat, groups).transpose(1, 2).unflatten(0, (batch, steps))

        parts = [visual[:, :, :1], audio[:, :, :1], pooled(visual[:, :, 1:]), pooled(audio[:, :, 1:])]
        types = torch.tensor([0, 1] + [2] * groups + [3] * groups, device=visual.device)
        tokens = self.memory_proj(torch.cat(parts, dim=2))              # (B, T, K, hidden)
        tokens = tokens + self.type_embed(types) + self.step_embed(
            torch.arange(steps, device=visual.device))[:, None]
        return tokens.flatten(1, 2)

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits `(C, L, V)` for caption prefixes `tokens (C, L)` over `memory (C, S, h)`."""
        length = tokens.shape[1]
        x = self.token_embed(tokens) + self.position_embed(torch.arange(length, device=tokens.device))
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)  # True: masked
        x = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True,
                         tgt_key_padding_mask=tokens == self.pad_id)
        return self.out_norm(x) @ self.token_embed.weight.t()

    # -- training ------------------------------------------------------------------------
    def forward(self, visual: torch.Tensor, audio: torch.Tensor, caption_tokens: torch.Tensor,
                caption_video_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher forcing.

        Args:
            visual, audio: the trunk's token sequences of B clips.
            caption_tokens: `(C, L)` captions as [bos] words [eos] [pad]...
            caption_video_index: `(C,)` the clip each caption describes.

        Returns:
            {"logits": (C, L-1, V) predictions of tokens 1..L-1, "targets": (C, L-1)}.
        """
        memory = self.memory(visual, audio)[caption_video_index]
        return {"logits": self.logits(memory, caption_tokens[:, :-1]), "targets": caption_tokens[:, 1:]}

    def loss(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Token cross-entropy, padding ignored. Returns (loss, {"token_accuracy"})."""
        logits, targets = outputs["logits"], outputs["targets"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.pad_id)
        real = targets != self.pad_id
        accuracy = ((logits.argmax(-1) == targets) & real).sum() / real.sum().clamp(min=1)
        return loss, {"token_accuracy": accuracy.item()}

    # -- decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, visual: torch.Tensor, audio: torch.Tensor, beam_size: int = 1,
                 max_length: int | None = None, length_penalty: float = 1.0,
                 prefix: torch.Tensor | None = None,
                 video_index: torch.Tensor | None = None) -> list[list[int]]:
        """Decode one text per clip, or per prefix (greedy when `beam_size` is 1).

        Beams are ranked by summed log-probability divided by `length ** length_penalty`
        (length counts the generated tokens up to and including the end token); a finished
        beam keeps its score and is only extended by padding.

        Args:
            prefix: `(C, P)` token ids every decoded text continues, each starting with the
                start token and none padded (so all C have the same length P); default: the
                start token alone. Generative question answering passes `[bos] question [sep]`.
            video_index: `(C,)` the clip each prefix is about (default: prefix i is clip i).

        Returns:
            Per clip (or prefix), the generated token ids after the prefix, without the end and
            padding tokens (nor the start token).
        """
        max_length = min(max_length or self.max_length, self.max_length)
        memory = self.memory(visual, audio)
        if video_index is not None:
            memory = memory[video_index]
        batch, beams = memory.shape[0], beam_size
        memory = memory.repeat_interleave(beams, dim=0)
        if prefix is None:
            prefix = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=memory.device)
        start = prefix.shape[1]
        tokens = prefix.to(memory.device).repeat_interleave(beams, dim=0)
        scores = torch.full((batch, beams), float("-inf"), device=memory.device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        finished = torch.zeros(batch * beams, dtype=torch.bool, device=memory.device)
        lengths = torch.zeros(batch * beams, device=memory.device)
        for _ in range(max_length - start):
            log_probs = self.logits(memory, tokens)[:, -1].float().log_softmax(-1)
            log_probs[:, self.pad_id] = float("-inf")
            # A finished beam may only append padding, at no cost.
            log_probs[finished] = float("-inf")
            log_probs[finished, self.pad_id] = 0.0
            vocab = log_probs.shape[-1]
            candidates = (scores.unsqueeze(-1) + log_probs.view(batch, beams, vocab)).view(batch, -1)
            scores, flat = candidates.topk(beams, dim=-1)
            origin = (flat // vocab + torch.arange(batch, device=memory.device)[:, None] * beams).flatten()
            next_token = (flat % vocab).flatten()
            tokens = torch.cat([tokens[origin], next_token[:, None]], dim=1)
            finished, lengths = finished[origin], lengths[origin]
            lengths = lengths + (~finished).float()
            finished = finished | (next_token == self.eos_id)
            if finished.all():
                break
        normalised = scores / lengths.view(batch, beams).clamp(min=1) ** length_penalty
        best = normalised.argmax(-1) + torch.arange(batch, device=memory.device) * beams
        special = {self.bos_id, self.eos_id, self.pad_id}
        return [[t for t in row if t not in special] for row in tokens[best, start:].tolist()]

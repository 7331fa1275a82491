"""The checks of the settings that compose with any method (`configs/method/*.yaml`): ChunkKV's `chunk`,
CriticalKV's `critical`, PyramidKV's and CAKE's `layers`, KIVI's `quant`, ThinK's `key_channels`. Each refuses,
in one line naming the fix, a method or stage it does not apply to."""

from __future__ import annotations

from kvbench.errors import KVBenchError

LAYER_SCHEDULES = ("uniform", "pyramid", "cake")
QUANT_MODES = ("none", "kivi2", "kivi4")


def check_wrappers(m) -> None:
    """Check the settings `m` (a Method) turns on."""
    if m.chunk:
        _chunk(m)
    if m.critical:
        _critical(m)
    if m.layers != "uniform":
        _layers(m)
    if m.quant != "none":
        _quant(m)
    if m.key_channels:
        _channels(m)


def _chunk(m) -> None:
    """`chunk` takes a method that scores every prompt token at a plain top-k cut, one set per KV head:
    those that take `heads: ada`, and SnapKV at `gqa: kv` (its per-head forms keep their own budgets)."""
    if m.chunk < 0:
        raise KVBenchError(f"method.chunk={m.chunk} must be >= 0 (0: off)")
    if m.heads == "ada":
        raise KVBenchError("method.chunk keeps the same chunks in every head: use method.heads=equal")
    if m.gqa == "expand":
        raise KVBenchError("method.chunk keeps the same chunks in every head: use method.gqa=kv")
    if not m.compresses or m.per_head or not (m.adapts or m.expands):
        raise KVBenchError(f"method.chunk takes a method that scores every prompt token at a plain top-k cut "
                           f"(knorm, keydiff, lagkv, random, snapkv; h2o, vatp, scissorhands, tova at "
                           f"stage=prefill); {m.name} does not: use method.chunk=0")
    if m.stage != "prefill":
        raise KVBenchError("method.chunk chooses chunks once, at the prompt cut: use method.stage=prefill")


def _critical(m) -> None:
    """`critical` re-ranks a prompt cut of scores for every prompt token, one set per KV head."""
    if not m.compresses or not (m.adapts or m.expands):
        raise KVBenchError(f"method.critical re-ranks a method that scores every prompt token (knorm, keydiff, "
                           f"lagkv, snapkv, expected_attention, pyramidkv, ...); {m.name} does not: use "
                           "method.critical=false")
    if m.stage != "prefill":
        raise KVBenchError("method.critical re-ranks the prompt cut: use method.stage=prefill")
    if m.gqa != "kv":
        raise KVBenchError("method.critical weighs each KV head's values: use method.gqa=kv")
    if m.chunk:
        raise KVBenchError("method.critical ranks tokens, method.chunk whole chunks: set one of them")
    if not 0 <= m.critical_ratio <= 1:
        raise KVBenchError(f"method.critical_ratio={m.critical_ratio} must be in [0, 1]")


def _layers(m) -> None:
    if m.layers not in LAYER_SCHEDULES:
        raise KVBenchError(f"method.layers={m.layers} is not one of: {', '.join(LAYER_SCHEDULES)}")
    if not m.compresses or not (m.adapts or m.expands) or (m.per_head and m.heads != "ada"):
        raise KVBenchError(f"method.layers={m.layers} sets layer budgets for a method with a plain top-k cut "
                           f"(knorm, snapkv, expected_attention, ...); {m.name} sets its own: use "
                           "method.layers=uniform")
    if m.stage != "prefill":
        raise KVBenchError(f"method.layers={m.layers} sets budgets at the prompt: use method.stage=prefill")
    if m.layers == "pyramid" and m.pyramid_beta < 1:
        raise KVBenchError(f"method.pyramid_beta={m.pyramid_beta} must be >= 1")
    if m.layers == "cake":
        _cake_layers(m)


def _cake_layers(m) -> None:
    """`layers: cake` cuts earlier layers again at later layers' cuts, by the scores of their own cut: the
    settings that rank by the budget (critical) or by chunks, or move a layer out of the dense store after its
    cut (heads: ada, quant, key_channels), cannot be cut again."""
    if m.heads == "ada":
        raise KVBenchError("method.layers=cake cuts earlier layers again, which a heads=ada (ragged) store cannot "
                           "take: use method.heads=equal or method.layers=pyramid")
    if m.chunk:
        raise KVBenchError("method.layers=cake cuts earlier layers again token by token, not by chunks: use "
                           "method.chunk=0 or method.layers=pyramid")
    if m.critical:
        raise KVBenchError("method.layers=cake cuts earlier layers again to budgets CriticalKV's ranking was not "
                           "made for: use method.critical=false or method.layers=pyramid")
    if m.reconstructs:
        raise KVBenchError(f"method.layers=cake sets budgets at each layer's prompt cut; {m.name} scores after "
                           "the prompt: use method.layers=uniform")
    if m.tau1 <= 0 or m.tau2 <= 0 or m.cake_window < 2:
        raise KVBenchError(f"method.tau1={m.tau1} and method.tau2={m.tau2} must be > 0 and method.cake_window="
                           f"{m.cake_window} >= 2 (a variance over the window queries)")


def _compact_store(m, setting: str, off: str) -> None:
    """What a quantized (`quant`) or pruned (`key_channels`) store takes: keys at their original positions, no
    value merges while decoding, and a layer that is not cut again once in it (CAKE's cascade)."""
    if m.positions != "original":
        raise KVBenchError(f"method.{setting} holds keys at their original positions: use method.positions=original")
    if m.compresses and m.stage == "decode" and m.merges:
        raise KVBenchError(f"method.{setting} holds the KV its own way, and {m.name} merges values while decoding: "
                           "use method.stage=prefill or another method")
    if m.cuts_layers_again:
        raise KVBenchError(f"method.{setting} holds each layer from its cut on, where CAKE's cascade cannot cut it "
                           f"again: use method.{setting}={off} (or method.layers=pyramid)")


def _quant(m) -> None:
    if m.quant not in QUANT_MODES:
        raise KVBenchError(f"method.quant={m.quant} is not one of: {', '.join(QUANT_MODES)}")
    _compact_store(m, "quant", "none")
    if m.quant_group < 1 or m.quant_residual < m.quant_group or m.quant_residual % m.quant_group:
        raise KVBenchError(f"method.quant_residual={m.quant_residual} must be a positive multiple of "
                           f"method.quant_group={m.quant_group}")


def _channels(m) -> None:
    if not 0 <= m.key_channels < 1 or m.channel_window < 1:
        raise KVBenchError(f"method.key_channels={m.key_channels} must be in [0, 1) and method.channel_window "
                           f"={m.channel_window} >= 1")
    if m.quant != "none":
        raise KVBenchError("method.key_channels and method.quant each hold the KV their own way: set one of them")
    _compact_store(m, "key_channels", "0")

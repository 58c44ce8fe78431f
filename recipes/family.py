"""The Celerity architecture and HP rules shared by every recipe (docs/method.md sections 3-4).

Pre-LN LayerNorm (eps 1e-5), ALiBi, squared-ReLU MLP with d_ff = 8 d_model, untied embeddings,
CompleteP, linear warmup + decay to zero, tau = tau_opt(TPP), B from the batch law.

Base hyperparameters are the paper's published muP-study proxy values (d_base 256, head dim 64):
sigma 8.67e-2, eta_base 1.62e-2, alpha_in 9.17, alpha_out 1.095. Celerity's own eta_base (0.15) is
not used because its base width and the other base values are unpublished. The base depth is 32
(Celerity tuned eta at depth 32).
"""

from __future__ import annotations

import dataclasses

from celerity_jax.config import (
  CollapseConfig,
  Config,
  MeshConfig,
  ModelConfig,
  OptimConfig,
  ParamConfig,
  RunConfig,
  ScalingConfig,
  TrainConfig,
)


def celerity(
  name: str,
  d_model: int,
  n_layers: int,
  d_head: int,
  tpp: float = 20.0,
  vocab_size: int = 128_256,
  seq_len: int = 8192,
  dtype: str = "bfloat16",
  d_base: int = 256,
  l_base: int = 32,
  remat: str = "none",
  microbatch_rows: int = 0,
) -> Config:
  """A Celerity member. `remat` and `microbatch_rows` (with FSDP over every device) are the layout
  a pod recipe ships for its slice; without rows the mesh is data parallel over the devices.

  Every pod recipe ships FSDP over the whole slice, `dots` remat and one sequence per device per
  microbatch: memory per chip is then the same on any slice, B stays within a few percent of the
  law, and the layout runs on any slice size. `python -m celerity_jax.commands.aot recipe=NAME
  --topology SLICE` checks that it fits; `--fit` ranks the alternatives. For 1.8B and 3.9B the
  search prefers 2- or 4-way tensor parallelism without remat (5-7% faster at the roofline bound)
  but at 90-95 GB per chip, many times the bytes between chips, and only on slice sizes that the
  tensor axis divides, so the recipes keep pure FSDP."""
  model = ModelConfig(
    vocab_size=vocab_size,
    d_model=d_model,
    n_layers=n_layers,
    n_heads=d_model // d_head,
    d_head=d_head,
    d_ff=8 * d_model,
    seq_len=seq_len,
    norm="layernorm",
    norm_eps=1e-5,
    position="alibi",
    mlp="squared_relu",
    dtype=dtype,
    remat=remat,
  )
  layout = microbatch_rows > 0
  return Config(
    model=model,
    mesh=MeshConfig(data=1, fsdp=-1) if layout else MeshConfig(),
    train=TrainConfig(microbatch_rows=microbatch_rows),
    param=ParamConfig(
      kind="completep",
      d_base=d_base,
      l_base=l_base,
      sigma_base=8.67e-2,
      alpha_in=9.17,
      alpha_out=1.095,
    ),
    scaling=ScalingConfig(tpp=tpp),
    optim=OptimConfig(lr_base=1.62e-2, b1=0.9, b2=0.95, eps=1e-8, schedule="linear"),
    run=RunConfig(dir=f"runs/{name}"),
  )


def moe(cfg: Config, experts: int = 8, top_k: int = 2, aux_loss: float = 0.01) -> Config:
  """A mixture-of-experts member: every MLP becomes `experts` routed experts (learned top-k router,
  dropless dispatch) of width d_ff / top_k, so the active parameters, and with them D = TPP x
  N_active
  and the FLOPs, equal the dense member's (plus the small router). The tau law and the collapse
  monitor then see the effective TPP = TPP * top_k / experts (scaling.effective_tpp). `aux_loss` is
  the load-balancing weight (Switch's 0.01 by default). The nano MoE recipes use 0.1: below the
  base width the router's readout multiplier d_base / d (4-16) makes routing sharp from the start,
  and at 0.01 one expert took 44% of celerity_moe_nano_2's tokens."""
  model = dataclasses.replace(
    cfg.model,
    experts=experts,
    top_k=top_k,
    router="topk",
    dispatch="dropless",
    expert_d_ff=cfg.model.d_ff // top_k,
    aux_loss=aux_loss,
    router_z_loss=0.001,
  )
  return dataclasses.replace(cfg, model=model)


# Sequences per step: about the critical batch at nano scale (tools.critical_batch, docs/results.md)
NANO_BATCH = 32


def nano(
  name: str, d_model: int, n_layers: int = 0, d_head: int = 16, batch_size: int = NANO_BATCH
) -> Config:
  """The CPU-sized family: Celerity rules at laptop scale for collapse experiments.

  d_head 16, n_layers = round(d_model / 32) (at least 1; `n_layers` sets it), d_ff 8 d_model,
  vocab 512 (a BPE tokenizer built from the stdlib corpus on first use), context 128, float32;
  held-out loss every 20 steps, a checkpoint every 25, a metrics row every step (every row is a
  point of the collapse curve).

  B is fixed at 32 sequences (4k tokens), not the batch law's D / 50: at D ~ 1e6 tokens the law
  gives 102-333 sequences, 3-10x above the critical batch measured at this scale, where the loss is
  18% worse at the same tokens and tau and the curve's shape is no longer set by tau, TPP and the
  schedule alone. Tau stays tau_opt(TPP), so lambda follows from B. `batch_size=0` keeps the law
  (celerity_tiny, the default run, which must stay a few minutes).

  The base HPs are the published width-256 proxy values (d_base 256, l_base 2), extrapolated down.
  A muTransfer sweep at base width 32 finds values that train every member 1-15% better, but the
  family then fans out by size (max Delta 0.09 against 0.03): docs/results.md, "The nano family".
  """
  cfg = celerity(
    name,
    d_model=d_model,
    n_layers=n_layers or max(1, round(d_model / 32)),
    d_head=d_head,
    tpp=20.0,
    vocab_size=512,
    seq_len=128,
    dtype="float32",
    l_base=2,
  )
  return dataclasses.replace(
    cfg,
    train=dataclasses.replace(cfg.train, eval_every=20, batch_size=batch_size),
    checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=25),
    run=dataclasses.replace(cfg.run, log_every=1),
    collapse=dataclasses.replace(cfg.collapse, align_start=0.4, align_end=0.6),
  )


# Sequences of 64 tokens per step in the long family: 256 tokens, 16x below the critical batch
# measured at nano scale (4k tokens); tools.collapse_experiment rechecks it at B / 2, 2B and 4B
LONG_BATCH = 4


def long(name: str, d_model: int) -> Config:
  """The long-run family: nano rules at a fixed depth of 2 layers, run for 5,800-26,500 steps so
  that collapse can be judged at the resolution the published definitions need (docs/collapse.md,
  "The long family").

  d_head 16, d_ff 8 d_model, vocab 512 (the stdlib BPE), float32, 20 TPP, tau_opt; context 64 and
  B = 4 sequences (256 tokens), so the smallest member (d 32, 74k parameters) takes 5,785 steps and
  the largest (d 80, 339k) 26,462; the largest reads 6.8M of the stdlib corpus's 16.9M training
  tokens, so no run repeats data. Held-out loss over a fixed 128 rows (8,192 tokens, the same rows
  at every B that divides 128); the experiment sets train.eval_every = T // 128. Base HPs are the
  published proxy values at l_base 2 (= the depth, so CompleteP's depth factors are 1). Four
  sequences split over at most 4 data-parallel devices: on a larger CPU set JAX_NUM_CPU_DEVICES.
  """
  cfg = nano(name, d_model, n_layers=2, batch_size=LONG_BATCH)
  return dataclasses.replace(
    cfg,
    model=dataclasses.replace(cfg.model, seq_len=64),
    train=dataclasses.replace(cfg.train, eval_every=200),
    data=dataclasses.replace(cfg.data, eval_batches=128 // LONG_BATCH),
    checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1000),
    collapse=CollapseConfig(),  # the paper's alignment window: the start-up is short here
  )


# The GPU family's vocabulary: a BPE tokenizer trained on the user's corpus (data.paths)
GPU_VOCAB = 32_768


def gpu(name: str, d_model: int, n_layers: int = 0, d_head: int = 64) -> Config:
  """The GPU-sized family (10M-150M parameters, 20 TPP): where the paper's regime begins, for the
  collapse experiment on one GPU (tools.collapse_experiment --family gpu).

  Celerity's shape rules at d_head 64 and n_layers = round(d_model / 50) (the paper's members have
  49-53 d_model per layer), vocab 32,768 (a 128k vocabulary would be 60-90% of every member's
  parameters), context 2048, bfloat16 compute. B is the batch law's (135-524 sequences, 720-2,800
  steps): at D = 2e8-3e9 the law is inside the range Celerity tuned it on, unlike the nano
  family's D ~ 1e6. The base HPs are the published width-256 proxy values, with l_base 5 (the
  depth of the width-256 member), so every member is within 2.6x of the base in width and depth.
  The corpus must hold at least D training tokens for the largest member (3e9): repeated data
  bends the curve, so the experiment checks it first.

  Each step runs in microbatches of 16 sequences (32k tokens; B unchanged up to rounding to a
  multiple of 16 x the devices, within 4% on one GPU): the largest member's step then peaks at
  28.5 GB compiled for one 95 GB v5p chip (`tools.aot recipe=celerity_gpu_150m --topology
  v5p:1x1x1`), well inside an 80 GB H100. On several GPUs lower train.microbatch_rows so that
  rows x devices stays near 16.
  """
  cfg = celerity(
    name,
    d_model=d_model,
    n_layers=n_layers or max(2, round(d_model / 50)),
    d_head=d_head,
    tpp=20.0,
    vocab_size=GPU_VOCAB,
    seq_len=2048,
    dtype="bfloat16",
    l_base=5,
    microbatch_rows=16,
  )
  return dataclasses.replace(
    cfg,
    train=dataclasses.replace(cfg.train, eval_every=100),
    checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=100),
    run=dataclasses.replace(cfg.run, log_every=1),
  )

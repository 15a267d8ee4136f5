#!/usr/bin/env python3
"""Train rwkv-lite's built-in demo model: a small byte-level RWKV-5.2 on the KJV Bible.

This is a tools-only script: it needs PyTorch, which rwkv-lite itself never imports at run time.

The model is exactly the RWKV-5.2 ("Eagle", x052) of the reference `rwkv` package (its x052 time mix and channel mix), with the
BlinkDL parameter names and shapes, so the saved ``<out>.pth`` loads in the reference ``rwkv`` pip package and in
rwkv-lite's normal converter.  Vocabulary = the 256 byte values (token id = byte value).

Sub-commands:

    train     train a model, write <out>.pth (fp32 state_dict), <out>.json (provenance, metrics), <out>.log
    check     compare this file's torch forward with the reference `rwkv` package on a saved .pth (CPU fp32)
    sample    greedy / sampled generation from a saved .pth with this file's torch code
    eval      held-out bits per byte of a saved .pth (CPU, float32; ~2.5 minutes for the demo model)
    selftest  compare the chunked WKV used in training with the plain per-token loop (float64, random inputs)

Examples (the defaults of `train` are the recipe of the shipped demo model; see docs/demo-model.md):

    python tools/train_demo.py selftest
    python tools/train_demo.py train --out /work/demo/kjv-b          # GPU, ~3.5 minutes on an H200
    python tools/train_demo.py train --steps 20 --n-layer 2 --n-embd 64 --head-size 32 --ctx 64 --batch 4 \\
        --device cpu --out /tmp/tiny
    python tools/train_demo.py check /tmp/tiny.pth
    python tools/train_demo.py sample /tmp/tiny.pth --prompt "And God said"

The training recurrence (``wkv5_chunked``) splits the sequence into short chunks.  Inside a chunk the
token-to-token weights are computed exactly from an explicit decay tensor (every exponent <= 0, so nothing can
overflow however fast a channel decays); across chunks the (H, N, N) state is carried like in inference.  It is
the same function as the reference's per-token loop up to float32 rounding order (``selftest`` checks it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "text", "kjv-bible.txt")
LAYER_NORM_EPS = 1e-5
# The reference computes ln_x as GroupNorm(o, eps=64e-5); RWKV-LM training writes it as GroupNorm(o / 8, eps=1e-5)
# (head_size_divisor 8).  Both are the same function: GN(o/8, e) == GN(o, 64 e).  We use the reference's form so
# the float32 rounding matches inference.
GROUP_NORM_EPS = 64e-5


# ----------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    n_layer: int = 6
    n_embd: int = 256  # C
    head_size: int = 64  # N; H = C / N heads
    ffn_dim: int = 1024  # F (4 * C here; Eagle uses floor(3.5 C / 32) * 32)
    vocab_size: int = 256  # bytes
    chunk_len: int = 16  # training-recurrence chunk; does not change the function, only speed and memory
    dropout: float = 0.0  # training only, on each block's two residual updates; nothing of it is saved

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def wkv5_sequential(r, k, v, log_w, u, state):
    """The reference recurrence (RWKV-5.2 WKV), one token at a time (slow; for checking).

    r, k, v: (B, T, H, N); log_w = log(decay) = -exp(time_decay), u = time_faaaa: (H, N);
    state S: (B, H, N, N) with S[b, h, i=key, j=value].  Returns (out (B, T, H, N), new state).
    """
    w = torch.exp(log_w)[None, :, :, None]  # decays the key index i
    u = u[None, :, :, None]
    outs = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, N_i, N_j)
        outs.append(torch.einsum("bhi,bhij->bhj", r[:, t], u * kv + state))
        state = kv + w * state
    return torch.stack(outs, dim=1), state


def _wkv5_whole_chunks(r, k, v, log_w, u, state, chunk_len):
    """wkv5 over T = n * chunk_len tokens.  Shapes as in ``wkv5_sequential``."""
    B, T, H, N = r.shape
    L = chunk_len
    nc = T // L
    # (B, H, nc, L, N)
    r, k, v = (x.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4) for x in (r, k, v))

    pos = torch.arange(L, device=r.device, dtype=r.dtype)
    # Intra-chunk: token s contributes to token t > s with weight prod_i r_t[i] k_s[i] w_i^(t-1-s), and to itself
    # through the bonus u.  decay[h, t, s, i] = w_i^(t-1-s) for s < t, else 0.  All exponents are <= 0.
    gap = pos[:, None] - 1 - pos[None, :]  # (t, s)
    causal = gap >= 0
    decay = torch.exp(gap.clamp(min=0)[None, :, :, None] * log_w[:, None, None, :])  # (H, L, L, N)
    decay = decay * causal[None, :, :, None]
    attn = torch.einsum("bhcti,htsi,bhcsi->bhcts", r, decay, k)  # (B, H, nc, L, L)
    bonus = torch.einsum("bhcti,hi,bhcti->bhct", r, u, k)
    attn = attn + torch.diag_embed(bonus)
    out = attn @ v  # (B, H, nc, L, N)

    # Inter-chunk: the state entering chunk c, decayed to token t of the chunk, read by r_t.
    w_pow_t = torch.exp(pos[None, :, None] * log_w[:, None, :])  # (H, L, N): w^t
    w_pow_rest = torch.exp((L - 1 - pos)[None, :, None] * log_w[:, None, :])  # w^(L-1-s)
    w_pow_chunk = torch.exp(L * log_w)[None, :, :, None]  # (1, H, N_i, 1): w^L
    chunk_kv = (k * w_pow_rest[None, :, None]).transpose(-1, -2) @ v  # (B, H, nc, N_i, N_j)
    states_in = []
    for c in range(nc):
        states_in.append(state)
        state = w_pow_chunk * state + chunk_kv[:, :, c]
    states_in = torch.stack(states_in, dim=2)  # (B, H, nc, N, N)
    out = out + (r * w_pow_t[None, :, None]) @ states_in

    out = out.permute(0, 2, 3, 1, 4).reshape(B, T, H, N)
    return out, state


def wkv5_chunked(r, k, v, log_w, u, state, chunk_len=16):
    """Same function as ``wkv5_sequential``, computed chunk by chunk (fast on a GPU, fine on a CPU)."""
    T = r.shape[1]
    L = min(chunk_len, T)
    whole = (T // L) * L
    out, state = _wkv5_whole_chunks(r[:, :whole], k[:, :whole], v[:, :whole], log_w, u, state, L)
    if whole < T:  # a shorter last chunk: exact, no padding (padding would wrongly decay the final state)
        tail, state = _wkv5_whole_chunks(r[:, whole:], k[:, whole:], v[:, whole:], log_w, u, state, T - whole)
        out = torch.cat([out, tail], dim=1)
    return out, state


def token_shift(x, prev):
    """Rows shifted down by one token; row 0 becomes ``prev`` (the last row of the previous call, or zeros)."""
    return torch.cat([prev[:, None, :], x[:, :-1, :]], dim=1)


class TimeMix(nn.Module):
    """RWKV-5.2 attention replacement.  Attribute names are the BlinkDL key names."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.cfg = cfg
        # Parameters first, then sub-modules: this is the BlinkDL key order (state_dict lists a module's own
        # parameters before its children's).  The reference's version detection depends on it.
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUP_NORM_EPS)

    def forward(self, a, prev_a, wkv_state):
        """a: LN1 output (B, T, C).  Returns (delta for the residual, new att_x, new wkv state)."""
        B, T, C = a.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        p = token_shift(a, prev_a)
        xk = a * self.time_mix_k + p * (1 - self.time_mix_k)
        xv = a * self.time_mix_v + p * (1 - self.time_mix_v)
        xr = a * self.time_mix_r + p * (1 - self.time_mix_r)
        xg = a * self.time_mix_g + p * (1 - self.time_mix_g)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # The recurrence always runs in float32, also under bf16 autocast.
        with torch.autocast(device_type=a.device.type, enabled=False):
            log_w = -torch.exp(self.time_decay.float())
            o, wkv_state = wkv5_chunked(
                r.float().view(B, T, H, N), k.float().view(B, T, H, N), v.float().view(B, T, H, N),
                log_w, self.time_faaaa.float(), wkv_state, self.cfg.chunk_len,
            )
            y = self.ln_x(o.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), a[:, -1], wkv_state


class ChannelMix(nn.Module):
    """RWKV-4/5 feed-forward: sigmoid(W_r x_r) * W_v relu(W_k x_k)^2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.ffn_dim
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, b, prev_b):
        p = token_shift(b, prev_b)
        xk = b * self.time_mix_k + p * (1 - self.time_mix_k)
        xr = b * self.time_mix_r + p * (1 - self.time_mix_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2), b[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.ln1 = nn.LayerNorm(C, eps=LAYER_NORM_EPS)
        self.ln2 = nn.LayerNorm(C, eps=LAYER_NORM_EPS)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=LAYER_NORM_EPS)  # applied once to the embedding
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # identity in eval mode; has no parameters

    def forward(self, x, layer_state):
        att_x, wkv, ffn_x = layer_state
        a = self.ln1(x)
        dx, att_x, wkv = self.att(a, att_x, wkv)
        x = x + self.drop(dx)
        b = self.ln2(x)
        dx, ffn_x = self.ffn(b, ffn_x)
        return x + self.drop(dx), (att_x, wkv, ffn_x)


class RWKV5(nn.Module):
    """Byte-level RWKV-5.2.  ``state_dict()`` keys are exactly the BlinkDL checkpoint keys."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.head_size == 0, "n_embd must be a multiple of head_size"
        # The reference detects v5.2 only from a 2-D time_decay seen after some ln_x key: that
        # needs at least 2 layers.
        assert cfg.n_layer >= 2, "the reference package misreads a 1-layer v5.2 model; use n_layer >= 2"
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.init_weights()

    def zero_state(self, batch: int, device=None):
        """Per layer (att_x (B, C), S (B, H, N, N), ffn_x (B, C)), all zeros, float32 (the reference's state layout)."""
        cfg = self.cfg
        device = device or self.head.weight.device
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)  # noqa: E731
        return [(z(batch, cfg.n_embd), z(batch, cfg.n_head, cfg.head_size, cfg.head_size), z(batch, cfg.n_embd))
                for _ in range(cfg.n_layer)]

    def forward(self, idx, state=None):
        """idx: (B, T) int64 byte ids.  Returns (logits (B, T, 256) float32, new state)."""
        if state is None:
            state = self.zero_state(idx.shape[0], idx.device)
        x = self.blocks[0].ln0(self.emb(idx))
        new_state = []
        for block, layer_state in zip(self.blocks, state):
            x, layer_state = block(x, layer_state)
            new_state.append(layer_state)
        return self.head(self.ln_out(x)).float(), new_state

    @torch.no_grad()
    def init_weights(self):
        """An init in the spirit of RWKV-LM's x052 (generate_init_weight and the TimeMix constructor)."""
        cfg = self.cfg
        C, L = cfg.n_embd, cfg.n_layer
        channel = torch.arange(C, dtype=torch.float32)
        ddd = (channel / C)[None, None, :]
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)  # tiny; ln0 rescales it
        for i, block in enumerate(self.blocks):
            ratio_0_to_1 = i / (L - 1)
            ratio_1_to_almost0 = 1.0 - i / L
            att, ffn = block.att, block.ffn
            # Token-shift mixes: deeper layers look more at the current token.
            att.time_mix_k.copy_(ddd ** ratio_1_to_almost0)
            att.time_mix_v.copy_(ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
            att.time_mix_r.copy_(ddd ** (0.5 * ratio_1_to_almost0))
            att.time_mix_g.copy_(ddd ** (0.5 * ratio_1_to_almost0))
            ffn.time_mix_k.copy_(ddd ** ratio_1_to_almost0)
            ffn.time_mix_r.copy_(ddd ** ratio_1_to_almost0)
            # Decay spread over channels: from very slow (w = exp(-e^-6)) to fast (w = exp(-e^-1) and beyond).
            decay_speed = -6 + 5 * (channel / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
            att.time_decay.copy_(decay_speed.view(cfg.n_head, cfg.head_size))
            zigzag = ((channel + 1) % 3 - 1) * 0.1
            att.time_faaaa.copy_((ratio_0_to_1 * (1 - channel / (C - 1)) + zigzag).view(cfg.n_head, cfg.head_size))
            # Projections: orthogonal; key and gate small; outputs that write the residual start at zero.
            for lin in (att.receptance, att.value, ffn.key):
                _orthogonal(lin.weight, 1.0)
            for lin in (att.key, att.gate):
                _orthogonal(lin.weight, 0.1)
            for lin in (att.output, ffn.value, ffn.receptance):
                nn.init.zeros_(lin.weight)
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            att.ln_x.bias.zero_()
        _orthogonal(self.head.weight, 0.5)


def _orthogonal(weight, scale):
    out_dim, in_dim = weight.shape
    gain = math.sqrt(out_dim / in_dim) if out_dim > in_dim else 1.0
    nn.init.orthogonal_(weight, gain=gain * scale)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: RWKV5, path: str) -> None:
    """fp32 state_dict with the BlinkDL key names and order, plain CPU tensors (loadable with weights_only)."""
    sd = {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in model.state_dict().items()}
    torch.save(sd, path)


def load_checkpoint(path: str, chunk_len: int = 16) -> RWKV5:
    """Rebuild the model from a BlinkDL-named v5.2 state_dict (dims read from the shapes)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    H, N = sd["blocks.0.att.time_decay"].shape
    cfg = ModelConfig(n_layer=n_layer, n_embd=sd["emb.weight"].shape[1], head_size=N,
                      ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0], vocab_size=sd["emb.weight"].shape[0],
                      chunk_len=chunk_len)
    model = RWKV5(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    heldout: torch.Tensor
    sha256: str
    n_lines: int
    n_heldout_lines: int


def load_corpus(path: str, heldout_fraction: float) -> Corpus:
    """One verse per line; the LAST ``heldout_fraction`` of the lines is held out (rounded up)."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    n_heldout = math.ceil(len(lines) * heldout_fraction)
    cut = len(lines) - n_heldout
    train = b"\n".join(lines[:cut]) + b"\n"
    heldout = b"\n".join(lines[cut:]) + b"\n"
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(heldout), hashlib.sha256(raw).hexdigest(), len(lines), n_heldout)


def random_windows(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator):
    """``batch`` random windows of ctx+1 bytes -> (inputs, targets), int64 (B, ctx)."""
    starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
    rows = torch.stack([data[s:s + ctx + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def bits_per_byte(model: RWKV5, data: torch.Tensor, n_streams: int, segment: int, max_bytes: int | None = None):
    """Mean bits per byte on ``data`` with the recurrence itself (float32).

    The text is cut into ``n_streams`` equal contiguous streams (the last < n_streams bytes dropped); every stream
    is read from a zero state in segments of ``segment`` bytes, the state carried between segments, and every byte
    after each stream's first is scored.  Returns (bpb, number of scored bytes).
    """
    device = model.head.weight.device
    if max_bytes is not None:
        data = data[:max_bytes]
    length = len(data) // n_streams
    streams = data[: length * n_streams].view(n_streams, length).long().to(device)
    state = None
    total_nats, count = 0.0, 0
    for start in range(0, length - 1, segment):
        end = min(start + segment, length - 1)
        logits, state = model(streams[:, start:end], state)
        targets = streams[:, start + 1:end + 1]
        total_nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total_nats / count / math.log(2), count


# ----------------------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model: RWKV5, prompt: bytes, n_bytes: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> bytes:
    """Greedy (temperature 0) or temperature/top-p sampling, one byte at a time with the carried state."""
    device = model.head.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits, state = model(torch.tensor([list(prompt)], device=device), None)
    out = bytearray()
    for _ in range(n_bytes):
        last = logits[0, -1].cpu()
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # smallest set with mass >= top_p
            sorted_p = sorted_p * keep
            nxt = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return bytes(out)


# ----------------------------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total: int, warmup: int, lr_max: float, lr_min: float) -> float:
    """Linear warmup, then cosine from lr_max down to lr_min."""
    if step < warmup:
        return lr_max * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: RWKV5, weight_decay: float):
    """Weight decay on the projection matrices (and head) only; not on emb, norms or time_* vectors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and name.endswith(".weight") and "emb" not in name and "time_" not in name
         else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cmd_train(args) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and not args.fp32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; evaluation below turns it off
        torch.backends.cudnn.allow_tf32 = True

    corpus = load_corpus(args.corpus, args.heldout_fraction)
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, head_size=args.head_size,
                      ffn_dim=args.ffn_dim or 4 * args.n_embd, chunk_len=args.chunk_len, dropout=args.dropout)
    model = RWKV5(cfg).to(device)
    n_params = count_parameters(model)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log_file = open(args.out + ".log", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"config {asdict(cfg)} params {n_params:,} device {device} ({gpu_name}) torch {torch.__version__}")
    log(f"corpus {args.corpus} sha256 {corpus.sha256} lines {corpus.n_lines} (held out last "
        f"{corpus.n_heldout_lines}); train {len(corpus.train):,} bytes, held-out {len(corpus.heldout):,} bytes")
    log(f"steps {args.steps} batch {args.batch} ctx {args.ctx} lr {args.lr} -> {args.lr_min} warmup {args.warmup} "
        f"wd {args.weight_decay} bf16 {use_bf16} seed {args.seed}")

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.99), eps=1e-8,
                                  fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    history, recent = [], []
    t0 = time.time()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.warmup, args.lr, args.lr_min)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = random_windows(corpus.train, args.batch, args.ctx, gen)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits, _ = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        recent.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean_loss = torch.stack(recent).mean().item()
            recent = []
            entry = {"step": step + 1, "loss": round(mean_loss, 4), "bpb": round(mean_loss / math.log(2), 4),
                     "lr": lr, "grad_norm": round(float(grad_norm), 3), "elapsed_s": round(time.time() - t0, 1)}
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                model.eval()
                entry["heldout_sample_bpb"], _ = bits_per_byte(model, corpus.heldout, 16, args.ctx, 16 * 2048)
                entry["heldout_sample_bpb"] = round(entry["heldout_sample_bpb"], 4)
                model.train()
            history.append(entry)
            log(json.dumps(entry))
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t0

    # Final evaluation in true float32 (no autocast, no TF32): the whole held-out text.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.eval()
    t1 = time.time()
    heldout_bpb, heldout_scored = bits_per_byte(model, corpus.heldout, args.eval_streams, args.ctx)
    train_sample_bpb, _ = bits_per_byte(model, corpus.train, args.eval_streams, args.ctx, len(corpus.heldout))
    shuffled = corpus.heldout[torch.randperm(len(corpus.heldout), generator=torch.Generator().manual_seed(0))]
    shuffled_bpb, _ = bits_per_byte(model, shuffled, args.eval_streams, args.ctx)
    eval_seconds = time.time() - t1
    log(f"held-out bpb {heldout_bpb:.4f} over {heldout_scored:,} bytes ({args.eval_streams} streams, fp32); "
        f"train-prefix bpb {train_sample_bpb:.4f}; byte-shuffled held-out bpb {shuffled_bpb:.4f}; "
        f"train {train_seconds:.1f}s eval {eval_seconds:.1f}s")

    samples = {}
    for prompt in args.prompts:
        text = generate(model, prompt.encode(), args.sample_bytes)
        samples[prompt] = text.decode("utf-8", errors="replace")
        log(f"greedy sample {prompt!r}: {samples[prompt]!r}")
    sampled = generate(model, args.prompts[0].encode(), args.sample_bytes, temperature=0.8, top_p=0.9,
                       seed=args.seed)
    samples[f"{args.prompts[0]} (temperature 0.8, top_p 0.9, seed {args.seed})"] = sampled.decode("utf-8", "replace")
    log(f"sampled (T=0.8, top_p=0.9): {sampled.decode('utf-8', 'replace')!r}")

    save_checkpoint(model, args.out + ".pth")
    with open(args.out + ".pth", "rb") as f:
        pth_sha = hashlib.sha256(f.read()).hexdigest()
    report = {
        "model": {"architecture": "RWKV-5.2 (x052), byte-level", **asdict(cfg), "n_head": cfg.n_head,
                  "parameters": n_params},
        "checkpoint": {"file": os.path.basename(args.out + ".pth"), "sha256": pth_sha, "dtype": "float32",
                       "keys": "BlinkDL"},
        "corpus": {"path": os.path.basename(args.corpus), "sha256": corpus.sha256, "lines": corpus.n_lines,
                   "heldout_lines": corpus.n_heldout_lines, "heldout_rule": "last 5% of lines (verses), rounded up",
                   "train_bytes": len(corpus.train), "heldout_bytes": len(corpus.heldout)},
        "training": {"steps": args.steps, "batch": args.batch, "ctx": args.ctx, "tokens_seen": args.steps * args.batch
                     * args.ctx, "lr": args.lr, "lr_min": args.lr_min, "warmup": args.warmup,
                     "schedule": "linear warmup + cosine", "optimizer": "AdamW betas (0.9, 0.99) eps 1e-8",
                     "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "bf16_autocast": use_bf16,
                     "seed": args.seed, "final_train_loss_nats": history[-1]["loss"],
                     "final_train_bpb": history[-1]["bpb"], "wall_seconds": round(train_seconds, 1)},
        "evaluation": {"heldout_bpb_fp32": round(heldout_bpb, 4), "heldout_scored_bytes": heldout_scored,
                       "method": f"whole held-out text as {args.eval_streams} contiguous streams, each from a zero "
                                 f"state, segments of {args.ctx} bytes with the state carried; float32, no TF32",
                       "train_prefix_bpb_fp32": round(train_sample_bpb, 4),
                       "shuffled_heldout_bpb_fp32": round(shuffled_bpb, 4)},
        "samples": samples,
        "history": history,
        "environment": {"torch": torch.__version__, "device": gpu_name, "python": platform.python_version()},
    }
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {args.out}.pth ({pth_sha[:16]}...), {args.out}.json, {args.out}.log")
    log_file.close()


# ----------------------------------------------------------------------------------------------------------------
# Checks


def cmd_selftest(args) -> None:
    """Chunked WKV vs per-token loop in float64: values, final state and gradients."""
    torch.manual_seed(0)
    worst = 0.0
    for T, L in [(37, 16), (64, 16), (5, 16), (48, 8)]:
        B, H, N = 2, 3, 8
        r, k, v = (torch.randn(B, T, H, N, dtype=torch.float64, requires_grad=True) for _ in range(3))
        time_decay = torch.randn(H, N, dtype=torch.float64) * 2  # up to very fast decays (w ~ exp(-e^6))
        time_decay.requires_grad_(True)
        u = torch.randn(H, N, dtype=torch.float64, requires_grad=True)
        s0 = torch.randn(B, H, N, N, dtype=torch.float64)
        results = []
        for fn in (wkv5_sequential, lambda *a: wkv5_chunked(*a, chunk_len=L)):
            out, s = fn(r, k, v, -torch.exp(time_decay), u, s0)
            grads = torch.autograd.grad((out.sin().sum() + s.cos().sum()), (r, k, v, time_decay, u))
            results.append((out, s, *grads))
        for name, a, b in zip(("out", "state", "dr", "dk", "dv", "dtime_decay", "du"), *results):
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
            worst = max(worst, err)
            print(f"T={T:3d} chunk={L:2d} {name:12s} max rel err {err:.2e}")
    print(f"worst {worst:.2e}")
    if worst > 1e-10:
        sys.exit("selftest FAILED")
    print("selftest ok")


def cmd_check(args) -> None:
    """Logits and state of this file's forward vs the reference `rwkv` package, CPU, float32."""
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV  # the reference (pip package `rwkv`)

    torch.backends.cuda.matmul.allow_tf32 = False
    tokens = list(args.text.encode())
    ours = load_checkpoint(args.pth)
    with torch.no_grad():
        our_logits, our_state = ours(torch.tensor([tokens]))
        # The same bytes in two calls, state carried (exercises chunk tails and state passing).
        cut = len(tokens) // 3
        l1, st = ours(torch.tensor([tokens[:cut]]))
        l2, st = ours(torch.tensor([tokens[cut:]]), st)
        split_logits = torch.cat([l1, l2], dim=1)
    ref = RWKV(model=args.pth, strategy="cpu fp32", verbose=False)
    assert ref.version == 5.2, f"reference detected v{ref.version}, expected 5.2"
    ref_logits, ref_state = ref.forward(tokens, None, full_output=True)
    serial_state, serial_last = None, None
    for t in tokens:  # the reference's one-token path
        serial_last, serial_state = ref.forward([t], serial_state)

    ours_all = our_logits[0]
    scale = ref_logits.abs().max().item()
    diff = (ours_all - ref_logits).abs().max().item()
    diff_serial = (ours_all[-1] - serial_last).abs().max().item()
    diff_split = (split_logits[0] - ref_logits).abs().max().item()
    state_diff = 0.0  # relative to each state tensor's largest entry
    for i, (att_x, wkv, ffn_x) in enumerate(our_state):
        for ours_t, ref_t in ((att_x[0], ref_state[3 * i]), (wkv[0], ref_state[3 * i + 1]),
                              (ffn_x[0], ref_state[3 * i + 2])):
            state_diff = max(state_diff, ((ours_t - ref_t).abs().max() / ref_t.abs().max()).item())
    print(f"{args.pth}: {len(tokens)} bytes, reference v{ref.version}, max |logit| {scale:.3f}")
    print(f"  all logits vs reference sequence mode: max |diff| {diff:.3e} (relative {diff / scale:.3e})")
    print(f"  last logits vs reference one-token mode: max |diff| {diff_serial:.3e}")
    print(f"  two calls with carried state vs reference: max |diff| {diff_split:.3e}")
    print(f"  final state (att_x, S, ffn_x) vs reference: max relative diff {state_diff:.3e}")
    if max(diff, diff_serial, diff_split) > args.tol * max(scale, 1.0):
        sys.exit("check FAILED")
    print("check ok")


def cmd_sample(args) -> None:
    model = load_checkpoint(args.pth)
    text = generate(model, args.prompt.encode(), args.n_bytes, args.temperature, args.top_p, args.seed)
    print(args.prompt + text.decode("utf-8", errors="replace"))


def cmd_eval(args) -> None:
    model = load_checkpoint(args.pth)
    corpus = load_corpus(args.corpus, args.heldout_fraction)
    bpb, n = bits_per_byte(model, corpus.heldout, args.eval_streams, args.segment, args.max_bytes)
    print(f"held-out bpb {bpb:.4f} over {n:,} bytes ({args.eval_streams} streams, fp32, CPU)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and write <out>.pth/.json/.log")
    p.add_argument("--out", required=True, help="output path prefix, e.g. /work/demo/rwkv5-kjv-byte")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--ffn-dim", type=int, default=0, help="default 4 * n_embd")
    p.add_argument("--chunk-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200, help="held-out sample bpb every N steps (0: never)")
    p.add_argument("--eval-streams", type=int, default=64)
    p.add_argument("--sample-bytes", type=int, default=300)
    p.add_argument("--prompts", nargs="+", default=["And God said", "Jesus answered and said unto them,"])
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="parity with the reference rwkv package (CPU fp32)")
    p.add_argument("pth")
    p.add_argument("--text", default="Ge1:1 In the beginning God created the heaven and the earth.\nGe1:2 And")
    p.add_argument("--tol", type=float, default=1e-4, help="max |diff| allowed, relative to max(|logit|, 1)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sample", help="generate from a saved .pth")
    p.add_argument("pth")
    p.add_argument("--prompt", default="And God said")
    p.add_argument("--n-bytes", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="held-out bits/byte of a saved .pth on the CPU")
    p.add_argument("pth")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--eval-streams", type=int, default=64)
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--max-bytes", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("selftest", help="chunked WKV == per-token loop (float64)")
    p.set_defaults(func=cmd_selftest)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

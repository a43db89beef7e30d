"""Text towers for HybridMED (arXiv 2410.00448): a BERT encoder and two report decoders.

HybridMED pretrains a chest X-ray image encoder from radiology reports. Besides contrastive
image<->impression and image-tokens<->findings objectives, it trains two decoders that
write the impression: a summariser (findings -> impression, cross-attending to the findings
encoder's tokens) and a captioner (image -> impression, cross-attending to the image
tokens). The two share everything but their cross-attention, so the captioner costs almost
no parameters, and the summariser (the teacher) is later distilled into it.

`BertEncoder` -- BERT (Devlin et al. 2019) exactly as Hugging Face's `BertModel`, so a
checkpoint converts into it with no loss (models/bert_convert.py relies on the names below):
  * embeddings: word + absolute learned position (0..L-1) + token type, LayerNorm, dropout;
  * post-LN layers: x = LN(x + Drop(MHSA(x))), then x = LN(x + Drop(MLP(x))); the MLP is
    Dense(mlp) -> exact erf GELU (HF's "gelu") -> Dense(hidden); dropout `dropout` on both
    residual branches and on the attention probabilities (HF's hidden_dropout_prob and
    attention_probs_dropout_prob); attention logits q.k / sqrt(head_dim);
  * padding: HF's extended mask, jnp.finfo(dtype).min added to the logits of padded keys;
  * pooler: tanh(Dense(tokens[:, 0])).
  Constants: LayerNorm eps 1e-12; weights and embeddings N(0, 0.02) (BERT's
  initializer_range), biases 0, LayerNorm scale 1 (HF also zeroes the [PAD] embedding row
  at init; irrelevant once a checkpoint is loaded).
  HF BertModel name (torch Linear weights are [out, in]: kernel = weight.T) -> ours:
    embeddings.word_embeddings.weight [V, D]           -> embeddings/word/embedding
    embeddings.position_embeddings.weight [max_len, D] -> embeddings/position/embedding
    embeddings.token_type_embeddings.weight            -> embeddings/token_type/embedding
    embeddings.LayerNorm.{weight, bias}                -> embeddings/norm/{scale, bias}
    encoder.layer.{i}. ->  layer_{i}/
      attention.self.{query,key,value}.weight -> attention/{query,key,value}/kernel
                                                 = weight.T.reshape(D, H, Dh)
      attention.self.{query,key,value}.bias   -> attention/{query,key,value}/bias
                                                 = bias.reshape(H, Dh)
      attention.output.dense.weight           -> attention/out/kernel
                                                 = weight.T.reshape(H, Dh, D)
      attention.output.dense.bias             -> attention/out/bias
      attention.output.LayerNorm.{weight,bias} -> attention_norm/{scale, bias}
      intermediate.dense.{weight, bias}       -> mlp/intermediate/{kernel, bias}
      output.dense.{weight, bias}             -> mlp/output/{kernel, bias}
      output.LayerNorm.{weight, bias}         -> mlp_norm/{scale, bias}
    pooler.dense.{weight, bias}                        -> pooler/{kernel, bias}
  Head h owns output channels h*Dh..(h+1)*Dh-1, as HF's view(B, L, H, Dh), which is what the
  row-major reshapes above give. The attention names are flax MultiHeadDotProductAttention's.
  `return_attention` gives the last layer's probabilities before dropout (HF returns them
  after it; the two agree at evaluation).

`ReportDecoders` -- a causal transformer decoder with one cross-attention per branch
(`branches`, default ('summariser', 'captioner')). Shared by all branches: the token and
position embeddings, every layer's self-attention, feed-forward and their norms, the final
norm and the output projection. Per branch: each layer's cross-attention and its norm
(`layer_{i}/cross_attention_{branch}`, `layer_{i}/cross_attention_norm_{branch}`; one
`layer_{i}/cross_attention` and `layer_{i}/cross_attention_norm` for all when
`share_cross_attention`) and a Dense projection of the memory to `hidden`
(`memory_{branch}`, always per branch: image tokens and findings tokens have their own
widths and statistics). Choices:
  * pre-LN (x + Drop(Attn(LN(x))), one LN at the end): the decoders are trained from
    scratch, and pre-LN trains stably without a long warm-up (Xiong et al. 2020), as GPT-2;
  * the output projection is tied to the token embedding (logits = LN(x) E^T + b, b a
    shared [V] bias): it saves V * hidden parameters and makes a word's input and output
    vectors one (Press & Wolf 2017), a regulariser for a decoder trained on reports only;
  * no padding mask on the decoder's own tokens: reports are right-padded and attention is
    causal, so a real token never sees a later pad (the loss masks the pad positions);
  * memory padding is masked with finfo(dtype).min as in the encoder; every example needs
    at least one real memory token.
  Init N(0, 0.02) as BERT, LayerNorm eps 1e-6.

KV cache (for decoding): flax's `decode=True` with a 'cache' collection, as flax's
examples/wmt. Build it with `init_cache` (one call with ids [B, length]: it allocates each
self-attention's keys/values [B, length, H, Dh], projects the memory once and stores each
layer's cross-attention keys/values and the memory mask); then `decode_step` feeds ids
[B, T] at the cache position `cache['index']` and advances it by T. Memory passed to a
step is ignored: the cache already holds it. Beam search reorders the cache with a gather
on its batch axis (every leaf but the scalar index).

Decoding (`greedy_decode`, `beam_search`) is jitted, with static shapes, on
`jax.lax.while_loop` that stops once every sequence has ended. Output ids [B, max_len] are
the generated tokens (BOS not included), EOS kept, pad after it. Beam search keeps one
pool of `beam_size` hypotheses ranked by the length-normalised score
  score(y) = log p(y) / lp(|y|),   lp(n) = ((5 + n) / 6) ** alpha   (GNMT, Wu et al. 2016),
where |y| counts the generated tokens including EOS; a finished hypothesis keeps its slot
while it ranks in the top `beam_size`, and one still running at `max_len` is finished there
(truncated). The loop stops when no running hypothesis can still beat the best finished
one (log p only falls and, for alpha >= 0, lp(n) <= lp(max_len), so log p / lp(max_len)
bounds every continuation). With beam_size=1 the pool is the extensions of one hypothesis,
all of one length, so it is greedy decoding. No token is forbidden: a trained model does
not emit [PAD] or [CLS].

Naming for the whole method: the model holds `img` (image tower), `txt` (BertEncoder) and
`dec` (ReportDecoders), so `TOWER_REGEXES` (fullmatch over '/'-joined paths, as
medguide_jax/paths.py) address each tower for an optimiser mask or a freeze; `TextTowers`
is the text half under these names.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PyTree = Any

# The project's tokenizer uses BERT's ids.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3   # [PAD], [UNK], [CLS], [SEP]

TOWER_REGEXES = {"img": r"img/.*", "txt": r"txt/.*", "dec": r"dec/.*"}

_init = nn.initializers.normal(stddev=0.02)   # BERT's initializer_range


def _mask_bias(allowed: jnp.ndarray, dtype: Dtype) -> jnp.ndarray:
  """Additive attention bias: 0 where allowed, finfo(dtype).min elsewhere (HF's extended
  mask); float32, as the logits it is added to. exp(min - max) is exactly 0, so masked keys
  get zero weight, and a row with no allowed key is uniform rather than NaN."""
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(jnp.float32)


class Attention(nn.Module):
  """Multi-head dot-product attention with flax MultiHeadDotProductAttention's names
  (query/key/value kernels [D, H, Dh], out kernel [H, Dh, D]).

  Queries from x [B, Lq, D], keys and values from `kv` [B, Lk, D'] (None: x). Keys are
  masked by `key_mask` [B, Lk] (True = real) and, when `causal`, by position (query i sees
  keys <= index + i). `cache`: None, 'self' (decoding: this call's keys/values are written
  into the cache at `index` and the whole cache is attended; with no cache yet this call
  allocates it, shaped like its own keys) or 'memory' (keys/values of `kv` are computed once,
  stored, and read by later calls). Returns (out [B, Lq, D], probabilities [B, H, Lq, Lk]
  float32, before dropout).
  """
  heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, kv: Optional[jnp.ndarray] = None, *,
               key_mask: Optional[jnp.ndarray] = None, causal: bool = False,
               train: bool = False, cache: Optional[str] = None,
               index: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"attention width {width} is not a multiple of heads {self.heads}.")
    proj = functools.partial(nn.DenseGeneral, (self.heads, width // self.heads),
                             dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_init)
    q = proj(name="query")(x)
    if cache == "memory" and self.has_variable("cache", "cached_key"):
      k = self.get_variable("cache", "cached_key")
      v = self.get_variable("cache", "cached_value")
    else:
      src = x if kv is None else kv
      k, v = proj(name="key")(src), proj(name="value")(src)
      if cache == "memory":
        self.variable("cache", "cached_key", lambda: k)
        self.variable("cache", "cached_value", lambda: v)
      elif cache == "self":
        ready = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if ready:
          start = (0, index, 0, 0)
          cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, start)
          cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, start)
          k, v = cached_k.value, cached_v.value
    lq, lk = q.shape[1], k.shape[1]
    allowed = jnp.ones((1, 1, lq, lk), bool)
    if key_mask is not None:
      allowed = allowed & key_mask[:, None, None, :].astype(bool)
    if causal:
      q_pos = jnp.arange(lq) + (0 if index is None else index)
      allowed = allowed & (jnp.arange(lk)[None, :] <= q_pos[:, None])[None, None]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1])) + _mask_bias(allowed, self.dtype)
    probs = jax.nn.softmax(logits, axis=-1)   # float32 whatever the compute dtype
    dropped = nn.Dropout(self.dropout, deterministic=not train)(probs)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=_init, name="out")(ctx)
    return out, probs


class Mlp(nn.Module):
  """Dense(mlp) ('intermediate') -> exact erf GELU -> Dense(input width) ('output')."""
  mlp: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=_init)
    h = nn.gelu(dense(self.mlp, name="intermediate")(x), approximate=False)
    return dense(x.shape[-1], name="output")(h)


class BertEmbeddings(nn.Module):
  """LN(word + position + token type), then dropout: ids [B, L] -> [B, L, hidden]."""
  vocab_size: int
  hidden: int
  max_len: int
  type_vocab: int
  eps: float
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, token_types: jnp.ndarray, *, train: bool
               ) -> jnp.ndarray:
    embed = functools.partial(nn.Embed, features=self.hidden, dtype=self.dtype,
                              param_dtype=jnp.float32, embedding_init=_init)
    x = (embed(self.vocab_size, name="word")(ids)
         + embed(self.max_len, name="position")(jnp.arange(ids.shape[1]))[None]
         + embed(self.type_vocab, name="token_type")(token_types))
    x = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class BertLayer(nn.Module):
  """Post-LN layer: x = LN(x + Drop(MHSA(x))); x = LN(x + Drop(MLP(x)))."""
  heads: int
  mlp: int
  eps: float
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, *, train: bool
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    norm = functools.partial(nn.LayerNorm, epsilon=self.eps, dtype=self.dtype,
                             param_dtype=jnp.float32)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y, probs = Attention(self.heads, self.dropout, self.dtype, name="attention")(
        x, key_mask=mask, train=train)
    x = norm(name="attention_norm")(x + drop(y))
    y = Mlp(self.mlp, self.dtype, name="mlp")(x)
    return norm(name="mlp_norm")(x + drop(y)), probs


class BertEncoder(nn.Module):
  """BERT encoder, Hugging Face BertModel's architecture and numerics (module docstring).

  Attributes:
    vocab_size: word-piece vocabulary size V.
    hidden: token width D.
    layers: number of transformer layers.
    heads: attention heads H (Dh = D / H).
    mlp: feed-forward width F.
    max_len: size of the position table (the longest input).
    type_vocab: number of token types (segments).
    eps: LayerNorm epsilon (BERT: 1e-12).
    dropout: hidden and attention-probability dropout (BERT: 0.1).
    pooler: add the tanh(Dense) pooler on the first ([CLS]) token.
    dtype: compute dtype; parameters and outputs are float32.
  """
  vocab_size: int
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  mlp: int = 3072
  max_len: int = 512
  type_vocab: int = 2
  eps: float = 1e-12
  dropout: float = 0.1
  pooler: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, mask: jnp.ndarray, *,
               token_types: Optional[jnp.ndarray] = None, train: bool = False,
               return_attention: bool = False) -> dict[str, jnp.ndarray]:
    """ids [B, L] int, mask [B, L] bool (True = real token) -> {'tokens' [B, L, D],
    'pooled' [B, D]} (+ 'attention' [B, H, L, L], the last layer's probabilities)."""
    if ids.ndim != 2 or ids.shape[1] > self.max_len:
      raise ValueError(f"BertEncoder ids must be [B, L] with L <= max_len {self.max_len}; "
                       f"got shape {tuple(ids.shape)}.")
    if token_types is None:
      token_types = jnp.zeros_like(ids)
    x = BertEmbeddings(self.vocab_size, self.hidden, self.max_len, self.type_vocab, self.eps,
                       self.dropout, self.dtype, name="embeddings")(ids, token_types,
                                                                    train=train)
    probs = None
    for i in range(self.layers):
      x, probs = BertLayer(self.heads, self.mlp, self.eps, self.dropout, self.dtype,
                           name=f"layer_{i}")(x, mask, train=train)
    first = x[:, 0]
    if self.pooler:
      first = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                                kernel_init=_init, name="pooler")(first))
    out = {"tokens": x.astype(jnp.float32), "pooled": first.astype(jnp.float32)}
    if return_attention:
      out["attention"] = probs
    return out


class DecoderLayer(nn.Module):
  """Pre-LN decoder layer: causal self-attention, cross-attention to the memory of
  `branch` (its own weights unless `share_cross_attention`), feed-forward."""
  heads: int
  mlp: int
  share_cross_attention: bool
  eps: float
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, memory: Optional[jnp.ndarray],
               memory_mask: jnp.ndarray, *, branch: str, train: bool, decode: bool,
               index: Optional[jnp.ndarray]) -> jnp.ndarray:
    norm = functools.partial(nn.LayerNorm, epsilon=self.eps, dtype=self.dtype,
                             param_dtype=jnp.float32)
    attention = functools.partial(Attention, self.heads, self.dropout, self.dtype)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y, _ = attention(name="self_attention")(
        norm(name="self_attention_norm")(x), causal=True, train=train,
        cache="self" if decode else None, index=index)
    x = x + drop(y)
    suffix = "" if self.share_cross_attention else f"_{branch}"
    y, _ = attention(name="cross_attention" + suffix)(
        norm(name="cross_attention_norm" + suffix)(x), memory, key_mask=memory_mask,
        train=train, cache="memory" if decode else None)
    x = x + drop(y)
    return x + drop(Mlp(self.mlp, self.dtype, name="mlp")(norm(name="mlp_norm")(x)))


class ReportDecoders(nn.Module):
  """Causal decoders, one per branch, sharing all but cross-attention (module docstring).

  Attributes:
    vocab_size: vocabulary size V (the encoder's tokenizer).
    hidden: token width D.
    layers, heads, mlp: depth, attention heads, feed-forward width.
    max_len: size of the position table (the longest decoded sequence, BOS included).
    branches: branch names; each has its own memory projection and cross-attention.
    memory_dims: width of each branch's memory, aligned with `branches`; None: every
      branch's memory is as wide as the memory passed to `init`. `init` creates the
      parameters of every branch (the others run on zero memory of their width).
    share_cross_attention: one cross-attention for all branches.
    eps: LayerNorm epsilon.
    dropout: embedding, residual and attention-probability dropout.
    dtype: compute dtype; parameters and logits are float32.
  """
  vocab_size: int
  hidden: int = 768
  layers: int = 6
  heads: int = 12
  mlp: int = 3072
  max_len: int = 128
  branches: Sequence[str] = ("summariser", "captioner")
  memory_dims: Optional[Sequence[int]] = None
  share_cross_attention: bool = False
  eps: float = 1e-6
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  def _check(self, branch: str, memory: Optional[jnp.ndarray]) -> None:
    if branch not in self.branches:
      raise ValueError(f"Unknown decoder branch {branch!r}; valid: {tuple(self.branches)}.")
    if self.memory_dims is not None:
      if len(self.memory_dims) != len(self.branches):
        raise ValueError(f"memory_dims {tuple(self.memory_dims)} must give one width per "
                         f"branch {tuple(self.branches)}.")
      want = self.memory_dims[list(self.branches).index(branch)]
      if memory is not None and memory.shape[-1] != want:
        raise ValueError(f"Branch {branch!r} takes memory of width {want} (memory_dims); "
                         f"got shape {tuple(memory.shape)}.")

  @nn.compact
  def __call__(self, ids: jnp.ndarray, memory: Optional[jnp.ndarray] = None,
               memory_mask: Optional[jnp.ndarray] = None, *, branch: str,
               train: bool = False, decode: bool = False) -> jnp.ndarray:
    """ids [B, L] int, memory [B, M, Dm], memory_mask [B, M] bool (None: all real) ->
    float32 logits [B, L, V] (position i predicts token i + 1). decode=True: use and
    update the 'cache' collection (module docstring; memory is ignored once it exists)."""
    self._check(branch, memory)
    embed = functools.partial(nn.Embed, features=self.hidden, dtype=self.dtype,
                              param_dtype=jnp.float32, embedding_init=_init)
    tokens = embed(self.vocab_size, name="token_embed")
    positions = embed(self.max_len, name="position_embed")
    layers = [DecoderLayer(self.heads, self.mlp, self.share_cross_attention, self.eps,
                           self.dropout, self.dtype, name=f"layer_{i}")
              for i in range(self.layers)]
    final_norm = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=jnp.float32,
                              name="final_norm")
    output_bias = self.param("output_bias", nn.initializers.zeros, (self.vocab_size,),
                             jnp.float32)
    projections = {b: nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=_init, name=f"memory_{b}") for b in self.branches}
    drop = nn.Dropout(self.dropout, deterministic=not train)
    if memory is not None and memory_mask is None:
      memory_mask = jnp.ones(memory.shape[:2], bool)

    def forward(b: str, memory, memory_mask, index) -> jnp.ndarray:
      start = 0 if index is None else index
      x = tokens(ids) + positions(start + jnp.arange(ids.shape[1]))[None]
      x = drop(x)
      if memory is not None:
        memory = projections[b](jnp.asarray(memory, self.dtype))
      for layer in layers:
        x = layer(x, memory, memory_mask, branch=b, train=train, decode=decode, index=index)
      return (tokens.attend(final_norm(x)) + output_bias).astype(jnp.float32)

    if not decode:
      if ids.shape[1] > self.max_len:
        raise ValueError(f"ReportDecoders ids are longer ({ids.shape[1]}) than max_len "
                         f"{self.max_len}.")
      if memory is None:
        raise ValueError("ReportDecoders needs memory (and its mask) unless decoding from a "
                         "cache.")
      if self.is_initializing():   # create every branch's parameters, not only this one's
        for i, other in enumerate(self.branches):
          if other != branch:
            width = memory.shape[-1] if self.memory_dims is None else self.memory_dims[i]
            zeros = jnp.zeros(memory.shape[:1] + (1, width), memory.dtype)
            forward(other, zeros, jnp.ones(zeros.shape[:2], bool), None)
      return forward(branch, memory, memory_mask, None)

    ready = self.has_variable("cache", "index")
    if not ready and memory is None:
      raise ValueError("The first decode=True call builds the cache and needs the memory.")
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    cached_mask = self.variable("cache", "memory_mask", lambda: memory_mask)
    if not ready:   # allocate: the length of `ids` is the cache length
      if ids.shape[1] > self.max_len:
        raise ValueError(f"Cache length {ids.shape[1]} exceeds max_len {self.max_len}.")
      return forward(branch, memory, memory_mask, None)
    logits = forward(branch, None, cached_mask.value, index.value)
    index.value = index.value + ids.shape[1]
    return logits


# ---------------------------------------------------------------------------
# Decoding with the cache.
# ---------------------------------------------------------------------------


def init_cache(model: ReportDecoders, params: PyTree, memory: jnp.ndarray,
               memory_mask: Optional[jnp.ndarray], *, branch: str, length: int) -> PyTree:
  """The 'cache' collection for decoding up to `length` tokens of `branch` from `memory`.

  The call's logits are discarded; under jit only the memory projections remain of it.
  """
  ids = jnp.zeros((memory.shape[0], length), jnp.int32)
  _, state = model.apply({"params": params}, ids, memory, memory_mask, branch=branch,
                         decode=True, mutable=["cache"])
  return state["cache"]


def decode_step(model: ReportDecoders, params: PyTree, cache: PyTree, ids: jnp.ndarray, *,
                branch: str) -> tuple[jnp.ndarray, PyTree]:
  """Feeds ids [B, T] at the cache position: (logits [B, T, V], the advanced cache)."""
  logits, state = model.apply({"params": params, "cache": cache}, ids, branch=branch,
                              decode=True, mutable=["cache"])
  return logits, state["cache"]


def length_penalty(length: jnp.ndarray, alpha: float) -> jnp.ndarray:
  """GNMT's length penalty ((5 + length) / 6) ** alpha (1 at alpha = 0)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0)**alpha


def _check_decode(model: ReportDecoders, max_len: int) -> None:
  if not 1 <= max_len <= model.max_len:
    raise ValueError(f"Decoding max_len {max_len} must be in [1, {model.max_len}] (the "
                     f"decoder's position table; BOS takes position 0).")


_DECODE_STATIC = ("model", "branch", "max_len", "bos_id", "eos_id", "pad_id")


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC)
def greedy_decode(model: ReportDecoders, params: PyTree, memory: jnp.ndarray,
                  memory_mask: Optional[jnp.ndarray], *, branch: str, max_len: int,
                  bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID
                  ) -> jnp.ndarray:
  """Argmax decoding from BOS: token ids [B, max_len] (EOS kept, pad after it)."""
  _check_decode(model, max_len)
  b = memory.shape[0]
  cache = init_cache(model, params, memory, memory_mask, branch=branch, length=max_len)

  def cond(state):
    t, _, _, _, done = state
    return (t < max_len) & ~jnp.all(done)

  def body(state):
    t, cache, last, out, done = state
    logits, cache = decode_step(model, params, cache, last[:, None], branch=branch)
    token = jnp.where(done, pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
    return t + 1, cache, token, out.at[:, t].set(token), done | (token == eos_id)

  state = (jnp.int32(0), cache, jnp.full((b,), bos_id, jnp.int32),
           jnp.full((b, max_len), pad_id, jnp.int32), jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, state)[3]


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC + ("beam_size", "alpha"))
def beam_search(model: ReportDecoders, params: PyTree, memory: jnp.ndarray,
                memory_mask: Optional[jnp.ndarray], *, branch: str, max_len: int,
                beam_size: int = 4, alpha: float = 0.6, bos_id: int = BOS_ID,
                eos_id: int = EOS_ID, pad_id: int = PAD_ID
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search (module docstring): the best hypothesis' ids [B, max_len] (EOS kept, pad
  after it) and its score log p / lp(length) [B]."""
  _check_decode(model, max_len)
  if beam_size < 1 or alpha < 0:
    raise ValueError(f"beam_size must be >= 1 and alpha >= 0; got {beam_size}, {alpha}.")
  b, k, v = memory.shape[0], beam_size, model.vocab_size
  neg = jnp.float32(-jnp.inf)
  cache = init_cache(model, params, memory, memory_mask, branch=branch, length=max_len)
  # Beams of one example are consecutive rows of the cache (row = example * k + beam).
  cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, k, axis=0), cache)
  rows = (jnp.arange(b) * k)[:, None]

  def cond(state):
    t, _, _, logp, score, finished, _ = state
    best_done = jnp.max(jnp.where(finished, score, neg), axis=-1)
    best_alive = jnp.max(jnp.where(finished, neg, logp), axis=-1) / length_penalty(
        max_len, alpha)
    return (t < max_len) & ~jnp.all(best_done >= best_alive)

  def body(state):
    t, cache, seqs, logp, score, finished, last = state
    logits, cache = decode_step(model, params, cache, last.reshape(b * k, 1), branch=branch)
    ext = logp[..., None] + jax.nn.log_softmax(logits[:, 0], axis=-1).reshape(b, k, v)
    ext = jnp.where(finished[..., None], neg, ext).reshape(b, k * v)
    # One pool: finished hypotheses as they are, then every extension of a running one.
    pool = jnp.concatenate([jnp.where(finished, score, neg),
                            ext / length_penalty(t + 1, alpha)], axis=-1)
    new_score, pick = jax.lax.top_k(pool, k)
    grown = pick >= k
    parent = jnp.where(grown, (pick - k) // v, pick)
    token = jnp.where(grown, (pick - k) % v, pad_id).astype(jnp.int32)
    seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, t].set(token)
    logp = jnp.where(grown, jnp.take_along_axis(ext, jnp.maximum(pick - k, 0), axis=-1),
                     jnp.take_along_axis(logp, parent, axis=-1))
    finished = jnp.where(grown, (token == eos_id) | (t == max_len - 1), True)
    take = (rows + parent).reshape(-1)
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else x[take], cache)
    return t + 1, cache, seqs, logp, new_score, finished, token

  first = jnp.arange(k)[None] == 0   # one live hypothesis; the other slots are empty
  state = (jnp.int32(0), cache, jnp.full((b, k, max_len), pad_id, jnp.int32),
           jnp.where(first, 0.0, neg) * jnp.ones((b, 1)), jnp.full((b, k), neg),
           ~first & jnp.ones((b, 1), bool), jnp.full((b, k), bos_id, jnp.int32))
  _, _, seqs, _, score, finished, _ = jax.lax.while_loop(cond, body, state)
  best = jnp.argmax(jnp.where(finished, score, neg), axis=-1)
  return (jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0],
          jnp.take_along_axis(score, best[:, None], axis=1)[:, 0])


class TextTowers(nn.Module):
  """The text half of HybridMED under the method's names: `txt` encodes the findings,
  `dec` decodes the impression from them (the summariser). Paths: txt/..., dec/...
  (`TOWER_REGEXES`)."""
  txt: BertEncoder
  dec: ReportDecoders

  def __call__(self, findings: jnp.ndarray, findings_mask: jnp.ndarray,
               impression: jnp.ndarray, *, branch: str = "summariser",
               train: bool = False) -> dict[str, Any]:
    """findings [B, Lf] + mask, impression ids [B, Li] -> {'findings': the encoder's
    outputs, 'logits': [B, Li, V]}."""
    enc = self.txt(findings, findings_mask, train=train)
    logits = self.dec(impression, enc["tokens"], findings_mask, branch=branch, train=train)
    return {"findings": enc, "logits": logits}

"""GGUF, llama.cpp's model file, both ways for RWKV-7 (llama.cpp's `rwkv7` architecture).

Written with the `gguf` package (llama.cpp's own writer). Names, shapes and hyperparameters are the ones
llama.cpp's loader (src/models/rwkv7.cpp) asks for:
- GGUF stores a matrix as torch's [out, in] (llama.cpp's ne = [in, out]); our LoRA pairs are stored
  [in, rank] / [rank, out] (the official layout), so they are transposed both ways;
- the six token-shift mixes of a time mix are one `time_mix_lerp_fused` [6, 1, 1, C] in the order r w k v a g;
- layer 0 has no value residual, but the loader wants v0/v1/v2 there: zeros, shaped as llama.cpp expects.
The tokenizer goes in as llama.cpp's `rwkv` vocabulary (World) or `gpt2` byte-level BPE (tokenizer.json),
and our own spec rides along under `rwkv_lm.tokenizer`, so it comes back exactly.

Reading dequantizes every tensor to fp32 (q8_0's scales are per block of 32, not the per-row scales of our
int8 path, so they cannot be kept as they are).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from ..files import CheckpointError, atomic_write
from ..model import RWKVConfig

ARCH = "rwkv7"
TOKENIZER_KEY = "rwkv_lm.tokenizer"  # our tokenizer spec, verbatim
LERP_ORDER = ("r", "w", "k", "v", "a", "g")  # the order of time_mix_lerp_fused's rows
TYPES = {  # --type -> (file type, the type of the big matrices)
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}
F32 = gguf.GGMLQuantizationType.F32

# our per-layer name -> (GGUF name, how the tensor changes on the way out)
#   "vec": [1, 1, C] or [H, N] -> [C];  "lora": transposed;  "same": as it is
_LAYER = {
    "ln1.weight": ("attn_norm.weight", "same"), "ln1.bias": ("attn_norm.bias", "same"),
    "ln2.weight": ("attn_norm_2.weight", "same"), "ln2.bias": ("attn_norm_2.bias", "same"),
    "att.w0": ("time_mix_w0.weight", "vec"), "att.a0": ("time_mix_a0.weight", "vec"),
    "att.v0": ("time_mix_v0.weight", "vec"), "att.k_k": ("time_mix_k_k.weight", "vec"),
    "att.k_a": ("time_mix_k_a.weight", "vec"), "att.r_k": ("time_mix_r_k.weight", "vec"),
    **{f"att.{p}{i}": (f"time_mix_{p}{i}.weight", "lora") for p in "wavg" for i in (1, 2)},
    "att.receptance.weight": ("time_mix_receptance.weight", "same"), "att.key.weight": ("time_mix_key.weight", "same"),
    "att.value.weight": ("time_mix_value.weight", "same"), "att.output.weight": ("time_mix_output.weight", "same"),
    "att.ln_x.weight": ("time_mix_ln.weight", "same"), "att.ln_x.bias": ("time_mix_ln.bias", "same"),
    "ffn.x_k": ("channel_mix_lerp_k.weight", "vec"),
    "ffn.key.weight": ("channel_mix_key.weight", "same"), "ffn.value.weight": ("channel_mix_value.weight", "same"),
}
_GLOBAL = {
    "emb.weight": "token_embd.weight", "blocks.0.ln0.weight": "token_embd_norm.weight",
    "blocks.0.ln0.bias": "token_embd_norm.bias", "ln_out.weight": "output_norm.weight",
    "ln_out.bias": "output_norm.bias", "head.weight": "output.weight",
}
# matrices llama.cpp keeps in f32 whatever the file type (its converter's rule: the decay LoRA feeds an exp)
_ALWAYS_F32 = ("time_mix_w1.weight", "time_mix_w2.weight")


def _key(template: str) -> str:
    return template.format(arch=ARCH)


# ---------------------------------------------------------------- writing

def write_gguf(sd: dict[str, torch.Tensor], cfg: RWKVConfig, path, *, type: str = "f32", tokenizer=None) -> Path:
    """Write an RWKV-7's floating-point tensors (our names) as a GGUF file llama.cpp runs. type: f32, f16, bf16,
    q8_0 or q4_0 (the big matrices; vectors, norms and the decay LoRA stay f32)."""
    if type not in TYPES:
        raise CheckpointError(f"GGUF type {type!r} is not one of {', '.join(TYPES)}")
    file_type, matrix_type = TYPES[type]
    tensors = _gguf_tensors(sd, cfg)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_context_length(1 << 20)  # a recurrent model has no context limit; llama.cpp wants a number
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.dim_ffn)
        w.add_layer_norm_eps(1e-5)  # nn.LayerNorm's default, which ln0/ln1/ln2/ln_out use
        w.add_wkv_head_size(cfg.head_size)
        w.add_decay_lora_rank(cfg.decay_lora)
        w.add_iclr_lora_rank(cfg.iclr_lora)
        w.add_value_residual_mix_lora_rank(cfg.value_lora)
        w.add_gate_lora_rank(cfg.gate_lora)
        w.add_head_count(0)  # llama.cpp reads it for every architecture; RWKV has no attention heads
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            _add_tokenizer(w, tokenizer, cfg.vocab_size)
        else:
            w.add_tokenizer_model("none")  # llama.cpp then runs the model on token ids, as many as vocab_size
            w.add_vocab_size(cfg.vocab_size)
        for name, data in tensors.items():
            qtype = matrix_type if data.ndim == 2 and not name.endswith(_ALWAYS_F32) else F32
            encoded, raw_dtype = _encode(data, qtype)
            w.add_tensor(name, encoded, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write)


def _gguf_tensors(sd: dict[str, torch.Tensor], cfg: RWKVConfig) -> dict[str, np.ndarray]:
    """The tensors under llama.cpp's names and layouts, fp32 numpy."""
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    out = {gname: sd[ours].numpy() for ours, gname in _GLOBAL.items()}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        out[f"blk.{i}.time_mix_lerp_fused.weight"] = torch.stack(
            [sd[p + f"att.x_{m}"].reshape(1, 1, -1) for m in LERP_ORDER]).numpy()
        if i == 0:  # llama.cpp's loader wants layer 0's unused value-residual tensors, shaped by the iclr rank
            sd[p + "att.v0"] = torch.zeros(cfg.n_embd)
            sd[p + "att.v1"] = torch.zeros(cfg.n_embd, cfg.iclr_lora)
            sd[p + "att.v2"] = torch.zeros(cfg.iclr_lora, cfg.n_embd)
        for ours, (gname, how) in _LAYER.items():
            t = sd[p + ours]
            t = t.reshape(-1) if how == "vec" else t.T if how == "lora" else t
            out[f"blk.{i}.{gname}"] = t.contiguous().numpy()
    return out


def _encode(data: np.ndarray, qtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array, raw type for add_tensor or None for a plain float array) for one tensor in `qtype`; rows that do not split into whole blocks of a
    quantized type go in f16 (as llama.cpp's converter does)."""
    if qtype == F32:
        return data.astype(np.float32), None
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    try:
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    except gguf.QuantError:
        return data.astype(np.float16), None


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    spec = tokenizer.spec
    w.add_string(TOKENIZER_KEY, spec)
    if spec == "world":
        tokens, types = _world_tokens(tokenizer, vocab_size)
        w.add_tokenizer_model("rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_eot_token_id(261)  # "\n\n" ends a turn in the World chat format (llama.cpp's converter says the same)
        return
    tokens, types, merges, eos = _bpe_tokens(json.loads(spec), vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # byte-level BPE split by GPT-2's regex, which tokenizers' ByteLevel uses
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if eos is not None:
        w.add_bos_token_id(eos)
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)


def _world_tokens(world, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """llama.cpp's `rwkv` vocabulary: id 0 a control token, then each World token as its bytes written the way
    Python writes a bytes literal's inside (llama.cpp unescapes them), then padding up to the model's vocab."""
    n = world.vocab_size
    if n > vocab_size:
        raise CheckpointError(f"the World vocabulary has {n} tokens, more than the model's {vocab_size}")
    tokens = [b"<s>"] + [repr(world.token_bytes(i))[2:-1].encode("utf-8") for i in range(1, n)]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (n - 1)
    tokens += [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - n)
    return tokens, types


def _bpe_tokens(spec: dict, vocab_size: int):
    """(tokens, types, merges, end-of-text id) of a byte-level BPE tokenizer.json."""
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise CheckpointError("llama.cpp takes byte-level BPE tokenizers (GPT-2 style) or the World vocabulary; "
                              "this tokenizer.json is neither")
    vocab = dict(model["vocab"])
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise CheckpointError(f"the tokenizer has {n} tokens, more than the model's vocabulary of {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = vocab.get("<|endoftext|>")
    return tokens, types, merges, eos


# ---------------------------------------------------------------- reading

def read_gguf(path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors under our names, config dict, metadata) of an RWKV-7 GGUF file, tensors dequantized to fp32."""
    path = Path(path)
    try:
        reader = _Reader(path, "r")
    except _CutShort as e:
        raise CheckpointError(f"{path}: tensor {e.tensor!r} runs past the end of the file; it is truncated") from None
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be read as GGUF; it is truncated or corrupt ({e})") from None
    arch = _field(reader, "general.architecture", path)
    if arch != ARCH:
        raise CheckpointError(f"{path}: a GGUF file of architecture {arch!r}; only RWKV-7 ({ARCH!r}) is read")
    tensors = {}
    for t in reader.tensors:
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be read ({e})") from None
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the reader's arrays are read-only maps
    config = RWKVConfig(
        vocab_size=_tensor(tensors, "token_embd.weight", path).shape[0],
        n_layer=int(_field(reader, _key(gguf.Keys.LLM.BLOCK_COUNT), path)),
        n_embd=int(_field(reader, _key(gguf.Keys.LLM.EMBEDDING_LENGTH), path)),
        head_size=int(_field(reader, _key(gguf.Keys.WKV.HEAD_SIZE), path)),
        dim_ffn=int(_field(reader, _key(gguf.Keys.LLM.FEED_FORWARD_LENGTH), path)),
        decay_lora=int(_field(reader, _key(gguf.Keys.Attention.DECAY_LORA_RANK), path)),
        iclr_lora=int(_field(reader, _key(gguf.Keys.Attention.ICLR_LORA_RANK), path)),
        value_lora=int(_field(reader, _key(gguf.Keys.Attention.VALUE_RESIDUAL_MIX_LORA_RANK), path)),
        gate_lora=int(_field(reader, _key(gguf.Keys.Attention.GATE_LORA_RANK), path)),
    )
    meta = {"format": "gguf"}
    spec = _tokenizer_spec(reader)
    if spec is not None:
        meta["tokenizer"] = spec
    return _our_tensors(tensors, config, path), config.to_dict(), meta


class _CutShort(Exception):
    def __init__(self, tensor: str):
        self.tensor = tensor


class _Reader(gguf.GGUFReader):
    """gguf's reader, naming the first tensor a truncated file cuts short (the reader itself fails on a reshape
    that names nothing)."""

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _, name, _, dims, raw_dtype, offset = field.parts
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
            if start_offs + int(offset[0]) + int(np.prod(dims)) * size // block > len(self.data):
                raise _CutShort(bytes(name).decode("utf-8", errors="replace"))
        super()._build_tensors(start_offs, fields)


def _our_tensors(tensors: dict[str, torch.Tensor], cfg: RWKVConfig, path) -> dict[str, torch.Tensor]:
    """llama.cpp's names and layouts back to ours (shapes are checked when they are copied into the model)."""
    out = {ours: _tensor(tensors, gname, path) for ours, gname in _GLOBAL.items()}
    C = cfg.n_embd
    for i in range(cfg.n_layer):
        g = lambda name: _tensor(tensors, f"blk.{i}.{name}", path)
        lerp = g("time_mix_lerp_fused.weight")
        if lerp.numel() != len(LERP_ORDER) * C:
            raise CheckpointError(f"{path}: tensor 'blk.{i}.time_mix_lerp_fused.weight' has shape {tuple(lerp.shape)}, "
                                  f"expected {(len(LERP_ORDER), 1, 1, C)}")
        for m, row in zip(LERP_ORDER, lerp.reshape(len(LERP_ORDER), C)):
            out[f"blocks.{i}.att.x_{m}"] = row.reshape(1, 1, C).clone()
        for ours, (gname, how) in _LAYER.items():
            if i == 0 and ours in ("att.v0", "att.v1", "att.v2"):
                continue  # placeholders for llama.cpp's loader
            t = g(gname)
            if how == "vec":
                t = t.reshape(cfg.n_head, cfg.head_size) if ours == "att.r_k" else t.reshape(1, 1, -1)
            elif how == "lora":
                t = t.T.contiguous()
            out[f"blocks.{i}.{ours}"] = t
    return out


def _tensor(tensors, name, path):
    if name not in tensors:
        raise CheckpointError(f"{path}: missing tensor {name!r}; is this an RWKV-7 GGUF file?")
    return tensors[name]


def _field(reader, key, path):
    field = reader.get_field(key)
    if field is None:
        raise CheckpointError(f"{path}: missing key {key!r}; is this an RWKV-7 GGUF file?")
    return field.contents()


def _tokenizer_spec(reader) -> str | None:
    """Our spec if the file carries it; else "world" for llama.cpp's rwkv vocabulary, a tokenizer.json for a
    gpt2 one, None for none."""
    field = reader.get_field(TOKENIZER_KEY)
    if field is not None:
        return field.contents()
    model = reader.get_field(gguf.Keys.Tokenizer.MODEL)
    if model is None:
        return None
    if model.contents() == "rwkv":
        return "world"
    if model.contents() == "gpt2":
        return _bpe_json(reader.get_field(gguf.Keys.Tokenizer.LIST).contents(),
                         reader.get_field(gguf.Keys.Tokenizer.MERGES).contents(),
                         reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents())
    return None


def _bpe_json(tokens: list[str], merges: list[str], types: list[int]) -> str:
    """A byte-level BPE tokenizer.json made from a gpt2 GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != gguf.TokenType.CONTROL}
    hf = Tokenizer(models.BPE(normal, [tuple(m.split(" ", 1)) for m in merges]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL])
    return hf.to_str()

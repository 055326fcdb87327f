"""QLoRA (Dettmers et al., 2023): LoRA from `peft` over a base whose seven Llama projections are stored in
4 bits by `bitsandbytes` (`Linear4bit`, NormalFloat4, double quantisation, blocks of 64), computing in the
model's dtype. Adapters, dropout, alpha and `train_unadapted` are LoRA's (`baselines/lora.py`), so the only
difference from `lora` is the 4-bit base (`lora_targets` and `use_dora` are LoRA's `OPTIONS` too; all seven
projections are quantised whichever carry adapters, as in a 4-bit checkpoint). lm_head stays in the model
dtype, as transformers' quantiser leaves the output layer.

The base is quantised the way transformers' bitsandbytes quantiser does when loading a checkpoint
(`Linear4bit` built on the meta device, the weight handed to `Params4bit(...).to(device)`, which quantises
it, and `model.is_loaded_in_4bit = True`, which is what makes peft wrap the layers with its 4-bit LoRA layer).
Not done here: `peft.prepare_model_for_kbit_training`, which would upcast every non-quantised parameter to
float32 and turn on gradient checkpointing; checkpointing is a generic key of its own, and the memory
tables keep one dtype for every method.

Bytes per quantised m × n weight (bitsandbytes' storage, counted by the meters as "params"):
    packed 4-bit codes       m·n / 2            (uint8)
    quantised absmax         m·n / 64           (uint8, one per block of 64)
    nested absmax            4·⌈m·n/64/256⌉     (float32, one per block of 256 absmax values)
    offset, NF4 code table   4 + 4·16           (float32)
plus the 256-entry float32 code table of the nested quantisation, shared by all layers. Where bitsandbytes
has no 4-bit kernels for the device, building the method fails with one line naming what is missing. On CPU
evaluation uses the training matmul, not bitsandbytes' AVX512-BF16 repacked one (see `quantize_projections`).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from baselines._common import LLAMA_PROJECTIONS, check_rank, one_of, target_linears
from baselines.lora import attach_adapters, lora_targets

DEFAULTS = {"lora_dropout": 0.05, "alpha_over_rank": 2.0, "train_unadapted": False, "quant_type": "nf4",
            "double_quant": True}
QUANT_TYPES = ("nf4", "fp4")
# the same literal as baselines/lora.py's OPTIONS (the registry reads each module's own source;
# tests/test_lora_options.py checks that the two agree)
OPTIONS = {"lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "use_dora": False}
BLOCKSIZE = 64


def quantize_projections(model, quant_type: str = "nf4", double_quant: bool = True) -> None:
    """Replace the seven projections of `model` by bitsandbytes 4-bit layers holding their weights (in
    place)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("needs the bitsandbytes package (pip install bitsandbytes)") from None
    if not hasattr(bnb.nn, "Linear4bit"):
        raise ValueError(f"bitsandbytes {bnb.__version__} has no Linear4bit (4-bit layers)")
    for name, linear in target_linears(model, LLAMA_PROJECTIONS):
        weight = linear.weight.data
        # the placeholder weight Linear4bit makes is replaced below; it is a real meta tensor even while fake
        # tensors are being built (estimates), since Params4bit cannot wrap a FakeTensor
        with unset_fake_temporarily(), torch.device("meta"):
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=weight.dtype, compress_statistics=double_quant,
                                      quant_type=quant_type, quant_storage=torch.uint8)
        try:
            layer.weight = _quantized(bnb, weight, layer, quant_type, double_quant)
        except (NotImplementedError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ValueError(f"bitsandbytes {bnb.__version__} cannot quantise to 4 bits on "
                             f"{weight.device.type} ({type(exc).__name__}: {first})") from None
        if linear.bias is not None:
            layer.bias = linear.bias
        # bitsandbytes repacks a CPU layer's codes for its AVX512-BF16 kernel on the first no-grad eval-mode
        # call, which asserts out_features % 32 == 0 (the CPU smoke models' 688- and 172-wide layers fail)
        # and exists on some CPUs only; without it evaluation runs the same 4-bit matmul as training, on
        # every CPU. An attribute of Linear4bit, read in its forward.
        layer.support_avx512bf16_for_cpu = False
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
    model.is_loaded_in_4bit = True


def _quantized(bnb, weight, layer, quant_type: str, double_quant: bool):
    """The 4-bit weight of `layer`: `Params4bit(weight).to(device)`, which quantises, as transformers does."""
    attrs = {"blocksize": BLOCKSIZE, "compress_statistics": double_quant, "quant_type": quant_type,
             "quant_storage": torch.uint8}
    if not isinstance(weight, FakeTensor):
        return bnb.nn.Params4bit(weight, requires_grad=False, module=layer, **attrs).to(weight.device)
    # Estimates (suites.measure.meters.fake_construction): Params4bit is a tensor subclass and cannot wrap a
    # FakeTensor (another one). The codes come from the call Params4bit._quantize makes, and a fake parameter
    # holds them with the attributes Params4bit would carry; every op after this is bitsandbytes' own.
    # tests/test_memory.py checks that such an estimate equals a real CPU-tracked run byte for byte.
    data, quant_state = bnb.functional.quantize_4bit(weight.contiguous(), **attrs)
    param = torch.nn.Parameter(data, requires_grad=False)
    for key, value in {**attrs, "quant_state": quant_state, "bnb_quantized": True, "module": layer}.items():
        setattr(param, key, value)
    layer.quant_state = quant_state
    return param


def build(model, cfg):
    # on the full-precision shapes; 4-bit weights are stored flat
    rank = check_rank(model, cfg["rank"], lora_targets(cfg))
    quant_type = one_of(cfg, "quant_type", QUANT_TYPES)
    double_quant = one_of(cfg, "double_quant", (False, True))
    if cfg.get("use_dora") and any(isinstance(p, FakeTensor) for p in model.parameters()):
        # peft's DoRA dequantizes each 4-bit weight to initialise its magnitude, inside a fake mode of its
        # own that cannot meet the estimate's (torch: "Mixing fake modes NYI")
        raise ValueError("use_dora=true cannot be estimated on the 4-bit base (peft's DoRA dequantizes the "
                         "4-bit weights under a fake mode of its own); measure it with --kind cpu or cuda")
    quantize_projections(model, quant_type, bool(double_quant))
    return attach_adapters(model, cfg, rank)

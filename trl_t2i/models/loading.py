"""Loading text-to-image models and processors, with the quantization details each family needs."""

import copy
import functools
import os
import sys
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoProcessor, BitsAndBytesConfig, PreTrainedModel

from . import llamagen, tiny
from .base import ModelFamily, unwrap_model
from .janus import JanusFamily
from .llamagen import LlamaGenFamily


FAMILIES: dict[str, type[ModelFamily]] = {family.model_type: family for family in (JanusFamily, LlamaGenFamily)}
"""Every supported model family, by the `config.model_type` it serves."""

TINY_MODELS = {
    tiny.TINY_JANUS: ("tiny-janus", tiny.TINY_REVISION, tiny.build_tiny_janus),
    llamagen.TINY_LLAMAGEN: ("tiny-llamagen", llamagen.tiny.TINY_REVISION, llamagen.build_tiny_llamagen),
}
"""The tiny models by name (`tiny:<family>`, never a Hub id): cache folder name, revision (bumped when the builder
changes) and builder."""

RENAMED_TINY_MODELS = {"trl-t2i/tiny-janus": tiny.TINY_JANUS, "trl-t2i/tiny-llamagen": llamagen.TINY_LLAMAGEN}
"""The tiny models' former names, which a Hub repo could have: they now go to the Hub like any id, and a failure
names the new one."""


def resolve_name(name_or_path: str) -> str:
    """The local directory of a tiny model's name (built on first use); any other hub id or path as it is."""
    if name_or_path not in TINY_MODELS:
        return name_or_path
    return tiny.cached_tiny_model(*TINY_MODELS[name_or_path])


def family_class(config) -> type[ModelFamily]:
    """The family serving `config.model_type`; a clear error for families we do not support."""
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported model type {config.model_type!r}. Supported model types: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[config.model_type]


def get_family(model_or_config, processing_class) -> ModelFamily:
    """The family object for a model (possibly wrapped) or its config, with the model's processing class."""
    config = unwrap_model(model_or_config).config if hasattr(model_or_config, "config") else model_or_config
    return family_class(config)(config, processing_class)


def with_skip_modules(quantization_config: BitsAndBytesConfig, family: type[ModelFamily]) -> BitsAndBytesConfig:
    """Add the family's unquantized modules (full paths) to a bitsandbytes config's `llm_int8_skip_modules`."""
    quantization_config = copy.deepcopy(quantization_config)
    skip = list(quantization_config.llm_int8_skip_modules or [])
    quantization_config.llm_int8_skip_modules = skip + [m for m in family.quantization_skip_modules if m not in skip]
    return quantization_config


def disable_bnb_cpu_repack(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit CPU layers on their autograd path.

    On AVX512-BF16 CPUs, a `Linear4bit` that runs once in eval mode without grad repacks its weight for an inference
    kernel that has no backward: LoRA gradients through it are then silently wrong. CUDA never takes that path.
    """
    # Only a model loaded through bitsandbytes has such layers, and then it is imported already: importing it here
    # otherwise would only print its start-up messages on every run.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The config of a model given by hub id or local path (a tiny model is built on first use)."""
    return AutoConfig.from_pretrained(resolve_name(name_or_path), trust_remote_code=trust_remote_code)


def load_family(name_or_path: str, processing_class=None, trust_remote_code: bool = False) -> ModelFamily:
    """The family of a model given by name, from its config and processing class alone (its weights stay unloaded):
    what the captions can be checked against before the model loads."""
    processing_class = processing_class or load_processor(name_or_path, padding_side="left")
    return get_family(load_config(name_or_path, trust_remote_code), processing_class)


def _naming_a_missing_model(load: Callable) -> Callable:
    """`load(name_or_path, ...)`, where a model that is neither a local folder nor to be had from the Hub is an error
    that names it and says how to download it or point at a local copy (transformers' own error says only that it
    could not connect)."""

    @functools.wraps(load)
    def load_naming_a_missing_model(name_or_path: str, *args, **kwargs):
        try:
            return load(name_or_path, *args, **kwargs)
        except OSError as error:
            if os.path.isdir(resolve_name(name_or_path)):  # a local folder: transformers names the file it lacks
                raise
            raise OSError(_missing_model(name_or_path, error)) from error

    return load_naming_a_missing_model


def _missing_model(name: str, error: OSError) -> str:
    if name in RENAMED_TINY_MODELS:
        return (
            f"Could not load the model {name!r} (`model_name_or_path`) from the Hugging Face Hub: trl_t2i's tiny "
            f"model of that name is now {RENAMED_TINY_MODELS[name]!r} (a name no Hub repo can have)."
        )
    hub_id = name.count("/") == 1 and not name.startswith(("/", ".", "~"))
    if not hub_id:
        return (
            f"Could not load the model {name!r} (`model_name_or_path`): there is no such local folder (and a Hub id "
            "is `namespace/name`). Pass the folder of a saved model, or of a LlamaGen converted with "
            "`trl-t2i convert_llamagen ... --output_dir FOLDER`."
        )
    return (
        f"Could not load the model {name!r} (`model_name_or_path`): it is not a local folder, and neither the Hugging "
        f"Face Hub nor its local cache has it ({type(error).__name__}). Models are downloaded on first use; where the "
        f"Hub cannot be reached, download it where it can (`hf download {name}`) and share that cache (HF_HOME; "
        "HF_HUB_OFFLINE=1 then skips a minute of retries per file), or download it to a folder (`hf download "
        f"{name} --local-dir FOLDER`) and pass `--model_name_or_path FOLDER`."
    )


@_naming_a_missing_model
def load_model(name_or_path: str, fp32_image_head: bool = True, **model_kwargs) -> PreTrainedModel:
    """Load a text-to-image model by hub id or local path (the tiny models of `TINY_MODELS` are built locally).

    `model_kwargs` go to `from_pretrained`; a bitsandbytes `quantization_config` gets the family's skip modules.
    `fp32_image_head` keeps the image head in fp32 (`ModelFamily.upcast_image_head`); FSDP, which flattens
    parameters of one dtype, needs it off.
    """
    path = resolve_name(name_or_path)
    family = family_class(load_config(path, model_kwargs.get("trust_remote_code", False)))
    if isinstance(model_kwargs.get("quantization_config"), BitsAndBytesConfig):
        model_kwargs["quantization_config"] = with_skip_modules(model_kwargs["quantization_config"], family)
    model = family.model_class.from_pretrained(path, **model_kwargs)
    if fp32_image_head:
        family.upcast_image_head(model)
    return model


def load_adapter(model: PreTrainedModel, adapter: str, model_name_or_path: str, what: str | None = None):
    """`PeftModel.from_pretrained(model, adapter)`, where an adapter whose layers `model` lacks (one trained on a
    model of another family) is an error naming the adapter, the base model and the one it was trained on, not PEFT's
    "Target modules ... not found". `what` names the adapter in the error (default: "The adapter '<adapter>'")."""
    from peft import PeftConfig, PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        trained_on = PeftConfig.from_pretrained(adapter).base_model_name_or_path
        origin = (
            f"it was trained on {trained_on!r} (its adapter_config.json's `base_model_name_or_path`): pass that as "
            "`--model_name_or_path`"
            if trained_on
            else "load it on the base model it was trained on (`--model_name_or_path`)"
        )
        raise ValueError(
            f"{what or f'The adapter {adapter!r}'} does not fit the base model {model_name_or_path!r}: {origin}. "
            f"(PEFT: {error})"
        ) from error


@_naming_a_missing_model
def load_processor(name_or_path: str, **kwargs):
    """Load the processing class (processor or tokenizer) that goes with `load_model(name_or_path)`."""
    return AutoProcessor.from_pretrained(resolve_name(name_or_path), **kwargs)

"""The memory model (`trl_t2i.memory`) against what the code really holds: the parameters of real and tiny models,
the KV cache the sampler allocates, 4-bit weights, and the live tensors of a layer, of the trainer's own loss and
training step and of the VQ decoder (counted on CPU with `scripts/memory_model.py`'s `LiveTensorBytes`)."""

import dataclasses
from collections import Counter
from unittest import mock

import pytest
import torch
from conftest import first_batch, load_script, make_config
from datasets import Dataset
from peft import LoraConfig
from transformers import JanusForConditionalGeneration, JanusVQVAE, JanusVQVAEConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from trl_t2i import divergences
from trl_t2i.decoding import prefill_distinct_rows
from trl_t2i.divergences import DIVERGENCES, get_divergence
from trl_t2i.memory import (
    EXACT_CHUNK_TEMPORARIES,
    PHASES,
    Architecture,
    TrainingSetup,
    _layer_activation_bytes,
    estimate,
    janus_pro_1b,
    janus_pro_1b_config,
    janus_pro_7b,
    janus_pro_7b_config,
    kv_cache_bytes,
    llamagen_t2i_xl,
    table_bytes,
    training_table_peaks,
    training_tables,
    vq_decode_bytes,
    weight_bytes,
)
from trl_t2i.models import (
    TINY_JANUS,
    JanusFamily,
    LlamaGenConfig,
    LlamaGenForImageGeneration,
    build_tiny_janus,
    build_tiny_llamagen,
    get_family,
    load_model,
)
from trl_t2i.rewards import colour_match
from trl_t2i.trainer import T2IGRPOTrainer


MEMORY_SCRIPT = load_script("memory_model")
LiveTensorBytes = MEMORY_SCRIPT.LiveTensorBytes


FP32 = {"weight_dtype": "float32", "mixed_precision": False}
"""A CPU run: weights, activations and the KV cache in fp32."""

JANUS_COMPONENTS = {  # parameter-name prefix → key of `Architecture.components()`
    "model.language_model.embed_tokens.": "text embeddings",
    "model.language_model.norm.": "LM norms",
    "lm_head.": "lm_head",
    "model.vision_model.": "vision tower",
    "model.aligner.": "vision aligner",
    "model.generation_embeddings.": "generation embeddings",
    "model.generation_aligner.": "generation aligner",
    "model.generation_head.": "generation head",
    "model.vqmodel.": "VQ-VAE",
}
LLAMAGEN_COMPONENTS = {
    "transformer.embed_tokens.": "generation embeddings",
    "transformer.norm.": "LM norms",
    "text_encoder.": "caption encoder",
    "caption_embedder.": "caption aligner",
    "image_head.": "generation head",
    "vqmodel.": "VQ-VAE",
}


def _component_params(model: torch.nn.Module, prefixes: dict[str, str]) -> dict[str, int]:
    """Parameters of `model` per component (a tied weight once, under its first name)."""
    counts = Counter()
    for name, param in model.named_parameters():
        if ".layers." in name and name.startswith(("model.language_model.", "transformer.")):
            counts["LM norms" if "norm" in name else "LM linears"] += param.numel()
        else:
            counts[next(component for prefix, component in prefixes.items() if name.startswith(prefix))] += (
                param.numel()
            )
    return dict(counts)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is the fastest, and spares a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("hidden_size, num_layers", [(32, 2), (64, 3), (48, 1)])
def test_janus_parameters_per_component_match_a_tiny_model(hidden_size, num_layers):
    model, _ = build_tiny_janus(hidden_size=hidden_size, num_layers=num_layers)
    architecture = Architecture.from_janus_config(model.config)
    assert architecture.components() == _component_params(model, JANUS_COMPONENTS)


@pytest.mark.parametrize("hidden_size, num_layers", [(32, 2), (64, 1)])
def test_llamagen_parameters_per_component_match_a_tiny_model(hidden_size, num_layers):
    model, _ = build_tiny_llamagen(hidden_size=hidden_size, num_layers=num_layers)
    architecture = Architecture.from_llamagen_config(model.config)
    assert architecture.components() == _component_params(model, LLAMAGEN_COMPONENTS)


@pytest.mark.parametrize(
    "architecture, build",
    [
        (janus_pro_1b, lambda: JanusForConditionalGeneration(janus_pro_1b_config())),
        (janus_pro_7b, lambda: JanusForConditionalGeneration(janus_pro_7b_config())),
        (llamagen_t2i_xl, lambda: LlamaGenForImageGeneration(LlamaGenConfig())),
    ],
)
def test_real_size_parameters_match_the_model_built_on_the_meta_device(architecture, build):
    with torch.device("meta"):
        model = build()
    prefixes = LLAMAGEN_COMPONENTS if isinstance(model, LlamaGenForImageGeneration) else JANUS_COMPONENTS
    assert architecture().components() == _component_params(model, prefixes)


@pytest.mark.parametrize("family_name", ["janus", "llamagen"])
@pytest.mark.parametrize("cfg_scale", [5.0, 1.0])
@pytest.mark.parametrize("compiled", [False, True])
def test_kv_cache_bytes_equal_the_buffers_the_sampler_allocates(family_name, cfg_scale, compiled):
    if family_name == "janus":
        model, processor = build_tiny_janus()
        from_config = Architecture.from_janus_config
    else:
        model, processor = build_tiny_llamagen()
        from_config = Architecture.from_llamagen_config
    family = get_family(model, processor)
    conditioning = family.encode_prompts(["a red cat"] * 3 + ["a big blue dog on the beach"] * 3)
    guided = cfg_scale != 1.0
    rows = family.guided_rows(conditioning) if guided else conditioning
    with torch.no_grad():  # what `sample_image_tokens` decodes with, eager or compiled (`StaticDecoder`)
        _, state = family.prefill(model, rows, static=True) if compiled else prefill_distinct_rows(family, model, rows)
    # the buffers under the keys and values (views of the positions so far, in the eager cache)
    buffers = {tensor.untyped_storage() for layer in state.cache.layers for tensor in (layer.keys, layer.values)}
    architecture = from_config(model.config, prompt_length=conditioning.tensors["input_ids"].size(1))
    setup = TrainingSetup(
        rollout_images=len(conditioning), micro_batch=1, guided_sampling=guided, compiled_rollouts=compiled, **FP32
    )
    assert kv_cache_bytes(architecture, setup) == sum(buffer.nbytes() for buffer in buffers)


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_weights_quantize_the_language_model_linears_and_nothing_else(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = load_model(TINY_JANUS, quantization_config=config, dtype=torch.float32)
    for path in JanusFamily.quantization_skip_modules:
        assert not any(isinstance(p, bnb.nn.Params4bit) for p in model.get_submodule(path).parameters())
    quantized = unquantized = 0
    for param in model.parameters():
        if isinstance(param, bnb.nn.Params4bit):  # packed values and their scales (the shared code tables aside)
            state = param.quant_state
            quantized += param.nbytes + state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
        else:
            unquantized += param.nbytes
    setup = TrainingSetup(rollout_images=1, micro_batch=1, load_in_4bit=True, double_quant=double_quant, **FP32)
    sizes = weight_bytes(Architecture.from_janus_config(model.config), setup)
    assert sizes.pop("LM linears") == quantized
    assert sum(sizes.values()) == unquantized  # every other component keeps its full-precision bytes


def test_4bit_estimate_keeps_the_skipped_modules_at_full_precision():
    architecture = janus_pro_7b()
    bf16 = TrainingSetup(rollout_images=8, micro_batch=2, lora_r=16)
    nf4 = dataclasses.replace(bf16, load_in_4bit=True, double_quant=True)
    full, quantized = weight_bytes(architecture, bf16), weight_bytes(architecture, nf4)
    assert quantized["LM linears"] == pytest.approx(architecture.lm_linear_params * (0.5 + 1 / 64), rel=1e-3)
    for component in ("text embeddings", "lm_head", "vision tower", "generation aligner", "VQ-VAE"):
        assert quantized[component] == full[component] == 2 * architecture.components()[component]
    # the image head is kept in fp32 (`ModelFamily.upcast_image_head`), except in DeepSpeed's bf16 model
    assert quantized["generation head"] == full["generation head"] == 4 * architecture.components()["generation head"]
    zero2 = weight_bytes(architecture, dataclasses.replace(bf16, zero_stage=2, num_processes=2))
    assert zero2["generation head"] == 2 * architecture.components()["generation head"]


CODEBOOKS = (1024, 4096)
"""Two codebook sizes: what a stage of the loss holds per `(B, N, V)` table is the growth of its live bytes from one
to the other, the rest (the language model's activations, masks, per-token values) being the same."""


@pytest.fixture(scope="module", params=["fp32", "bf16 DeepSpeed"])
def trainers_by_codebook(request, tmp_path_factory):
    """LoRA trainers on a tiny Janus of each of `CODEBOOKS`, with their first micro-batch of 2 images. The image head
    computes in fp32 (fp32 weights, or bf16 ones under autocast: the head is kept in fp32), or in bf16 (DeepSpeed's
    bf16 model: `image_head_logits` casts the bf16 logits)."""
    bf16 = request.param == "bf16 DeepSpeed"
    trainers = {}
    for codebook_size in CODEBOOKS:
        model, processor = build_tiny_janus(codebook_size=codebook_size)
        trainer = T2IGRPOTrainer(
            model=model,
            reward_funcs=colour_match,
            args=make_config(
                tmp_path_factory.mktemp("run"), per_device_train_batch_size=2, num_generations=2, bf16=bf16
            ),
            train_dataset=Dataset.from_dict({"prompt": ["a red cat", "a blue car"]}),
            processing_class=processor,
            peft_config=LoraConfig(r=4, lora_alpha=8),
        )
        if bf16:
            trainer.model.get_submodule(f"base_model.model.{JanusFamily.image_head}").to(torch.bfloat16)
        trainer.current_gradient_accumulation_steps = 1
        trainers[codebook_size] = (trainer, first_batch(trainer))
    return request.param, trainers


def _loss_stage_peaks(trainer, inputs) -> dict[str, int]:
    """The live tensor bytes at the peak of each stage of the trainer's own loss on a micro-batch and its backward,
    named as `training_table_peaks` names them: `policy` (the policy forward and TRL's loss), `reference` (the
    penalty, which with the exact estimator scores the reference's tables) and `backward`."""
    peaks, live, penalty = {}, LiveTensorBytes(), trainer._divergence_penalty

    def end_stage(name):
        peaks[name] = live.peak
        live.reset_peak()

    def probed_penalty(*args, **kwargs):
        end_stage("policy")
        try:
            return penalty(*args, **kwargs)
        finally:
            end_stage("reference")

    with mock.patch.object(trainer, "_divergence_penalty", probed_penalty), live:
        loss = trainer._compute_loss(trainer.model, inputs)
        if "policy" not in peaks:  # no reference, no penalty
            end_stage("policy")
        live.reset_peak()
        loss.backward()
        end_stage("backward")
    return peaks


@pytest.mark.parametrize(
    "estimator, divergence", [(None, None), ("sampled", "js")] + [("exact", name) for name in DIVERGENCES]
)
@pytest.mark.parametrize("guided", [True, False])
def test_training_tables_match_the_live_tensors_of_the_trainers_loss(
    trainers_by_codebook, monkeypatch, guided, estimator, divergence
):
    head, trainers = trainers_by_codebook
    # One position per chunk: the penalty's chunk temporaries, which the model bounds from above, stay small here.
    monkeypatch.setattr(divergences, "EXACT_ROWS_PER_CHUNK", 1)
    bf16 = head == "bf16 DeepSpeed"
    setup = TrainingSetup(
        rollout_images=2,
        micro_batch=2,
        guided_scoring=guided,
        divergence_estimator=estimator or "sampled",
        reference=estimator is not None,  # without one, full fine-tuning at β = 0: no penalty
        mixed_precision=bf16,
        weight_dtype="bfloat16" if bf16 else "float32",
        zero_stage=2 if bf16 else 0,
    )
    peaks, tables = {}, {}
    for codebook_size, (trainer, inputs) in trainers.items():
        monkeypatch.setattr(trainer, "has_reference", estimator is not None)
        monkeypatch.setattr(trainer.args, "cfg_scale", 5.0 if guided else 1.0)
        monkeypatch.setattr(trainer.args, "divergence_estimator", estimator or "sampled")
        monkeypatch.setattr(trainer.args, "divergence", divergence or "js")
        monkeypatch.setattr(trainer, "divergence", get_divergence(divergence or "js"))
        architecture = Architecture.from_janus_config(trainer.family.config)
        peaks[codebook_size], tables[codebook_size] = (
            _loss_stage_peaks(trainer, inputs),
            table_bytes(architecture, setup),
        )
    expected = training_table_peaks(architecture, setup)
    small, large = CODEBOOKS
    chunk_allowance = EXACT_CHUNK_TEMPORARIES / (2 * trainer.family.num_image_tokens) if estimator == "exact" else 0.0
    for stage, count in expected.items():
        measured = (peaks[large][stage] - peaks[small][stage]) / (tables[large] - tables[small])
        assert count - chunk_allowance - 0.01 <= measured <= count + 0.01, (stage, measured, count)


@pytest.mark.parametrize(
    "estimator, cfg_scale, bf16", [("exact", 5.0, True), ("sampled", 1.0, False), ("sampled", 5.0, True)]
)
def test_training_peaks_match_the_live_tensors_of_a_trainer_step(tmp_path, monkeypatch, estimator, cfg_scale, bf16):
    script = MEMORY_SCRIPT
    monkeypatch.setattr(
        divergences, "EXACT_ROWS_PER_CHUNK", 1
    )  # the chunk temporaries, bounded from above, stay small
    model, processor = build_tiny_janus(codebook_size=4096, image_tokens_per_side=8)  # the (B, N, V) tables dominate
    prompts = ["a red cat", "a blue car"]
    args = make_config(
        tmp_path,
        per_device_train_batch_size=2,
        num_generations=2,
        max_steps=1,
        bf16=bf16,
        activation_checkpointing=True,
        divergence_estimator=estimator,
        cfg_scale=cfg_scale,
    )
    measured, prompt_length = script.measure_training_step(model, processor, prompts, args, lora_r=4)
    setup = TrainingSetup(
        rollout_images=2,
        micro_batch=2,
        lora_r=4,
        divergence_estimator=estimator,
        guided_sampling=cfg_scale != 1.0,
        guided_scoring=cfg_scale != 1.0,
        weight_dtype="float32",
        mixed_precision=bf16,
        reward=None,
        compiled_rollouts=False,  # rollouts on CPU are eager (`compile_rollouts: auto`)
    )
    result = estimate(Architecture.from_janus_config(model.config, prompt_length=prompt_length), setup)
    predicted = {phase: script.dynamic_bytes(result, phase) for phase in result.phases}
    # The model counts the backward through the tables in `loss`; the trainer runs it in `backward`.
    training = max(predicted["loss"], predicted["backward"])
    assert max(measured["loss"], measured["backward"]) == pytest.approx(training, rel=0.05)
    if estimator == "sampled":  # the reference re-scores the rollout without gradient
        assert measured["scoring"] == pytest.approx(predicted["scoring"], rel=0.1)


@pytest.mark.parametrize("lora_r", [None, 8])
def test_layer_activations_match_the_live_tensors_of_a_llama_layer(lora_r):
    from peft import get_peft_model

    hidden_size, intermediate_size, heads, length, rows = 256, 704, 4, 96, 2
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=1,
    )
    layer = LlamaDecoderLayer(config, layer_idx=0)
    if lora_r is not None:
        lora = LoraConfig(r=lora_r, target_modules=list(janus_pro_1b().lm_linear_shapes()))
        get_peft_model(torch.nn.ModuleDict({"layer": layer}), lora)
    hidden_states = torch.randn(rows, length, hidden_size, requires_grad=True)
    position_embeddings = LlamaRotaryEmbedding(config)(hidden_states, torch.arange(length)[None])
    mask = torch.ones(rows, 1, length, length, dtype=torch.bool).tril()
    with LiveTensorBytes() as live:
        output = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings)
    saved = live.current - output.untyped_storage().nbytes()
    architecture = dataclasses.replace(
        janus_pro_1b(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden_size // heads,
    )
    setup = TrainingSetup(rollout_images=1, micro_batch=1, lora_r=lora_r, **FP32)
    assert saved == pytest.approx(_layer_activation_bytes(architecture, setup) * rows * length, rel=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vq_decoding_peak_matches_the_live_tensors_of_the_decoder(dtype):
    config = JanusVQVAEConfig(base_channels=32, latent_channels=64, num_embeddings=64)  # Janus' 5 levels, narrower
    config.num_patches = 4
    vqmodel = JanusVQVAE(config).eval().to(dtype)
    with torch.no_grad(), LiveTensorBytes() as live:
        vqmodel.decode(torch.randint(64, (2, 16)))
    architecture = dataclasses.replace(janus_pro_1b(), vq_decoder_channels=32, image_size=4 * 2**4)
    weight_dtype = "float32" if dtype == torch.float32 else "bfloat16"
    setup = TrainingSetup(rollout_images=2, micro_batch=1, weight_dtype=weight_dtype, mixed_precision=False)
    assert live.peak == pytest.approx(vq_decode_bytes(architecture, setup), rel=0.02)


@pytest.mark.parametrize(
    ("dtype", "zero_stage"),
    [(torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 2)],
    ids=["fp32", "bf16 with its fp32 VQ model", "bf16 cast down whole by DeepSpeed"],
)
def test_llamagen_fp32_decoding_matches_the_live_tensors(dtype, zero_stage):
    # LlamaGen decodes in fp32 whatever the model's dtype: a bf16 model keeps its VQ model in fp32
    # (`_keep_in_fp32_modules_strict`); one that DeepSpeed cast down whole decodes on fp32 copies of the decoder's
    # weights
    vq_config = {"base_channels": 32, "latent_channels": 64, "channel_multiplier": [1, 1, 2, 2, 4]}
    model = LlamaGenForImageGeneration(
        LlamaGenConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, codebook_size=16384,
                       image_grid_size=4, text_encoder_config={"d_model": 32, "num_layers": 1, "num_heads": 4},
                       vq_config=vq_config)
    ).to(dtype)  # fmt: skip
    if zero_stage == 0:
        model.vqmodel.float()  # as `from_pretrained(..., dtype=torch.bfloat16)` leaves it
    architecture = Architecture.from_llamagen_config(model.config)
    assert architecture.vq_decoder_params == sum(
        param.numel() for name, param in model.vqmodel.named_parameters() if name.startswith(("post_quant", "decoder"))
    )
    with LiveTensorBytes() as live:
        model.decode_image_tokens(torch.randint(16384, (2, 16)))
    weight_dtype = str(dtype).removeprefix("torch.")
    setup = TrainingSetup(rollout_images=2, micro_batch=2, weight_dtype=weight_dtype, zero_stage=zero_stage)
    decoding = [item.bytes for item in estimate(architecture, setup).items if "decod" in item.name]
    assert live.peak == pytest.approx(sum(decoding), rel=0.05)


def test_phases_that_do_not_coexist_are_not_added():
    result = estimate(
        janus_pro_1b(), TrainingSetup(rollout_images=32, micro_batch=4, lora_r=32, compiled_rollouts=False)
    )
    kv_cache = next(item for item in result.items if item.name.startswith("KV cache"))
    tables = next(item for item in result.items if item.name.startswith("(B, N, V) tables"))
    assert kv_cache.phases == ("sampling",) and tables.phases == ("loss",)
    # The compiled decode keeps its static cache (608 positions rounded up to 640, and one more) between rollouts
    compiled = estimate(janus_pro_1b(), dataclasses.replace(result.setup, compiled_rollouts=True))
    static = next(item for item in compiled.items if item.name.startswith("KV cache"))
    assert static.phases == PHASES and static.bytes == kv_cache.bytes * 641 / 608
    assert result.peak == max(result.phase_total(phase) for phase in result.phases)
    assert result.peak < sum(item.bytes for item in result.items)
    assert tables.bytes == training_tables(janus_pro_1b(), result.setup) * table_bytes(janus_pro_1b(), result.setup)


def test_every_recipe_header_quotes_the_memory_model():
    # The headers are written by `python scripts/memory_model.py --write_headers`: a change of the model (or of a
    # recipe's settings) that moves a number fails here until they are rewritten.
    script = MEMORY_SCRIPT
    recipes = [
        path for directory in script.RECIPE_DIRS for path in sorted((script.RECIPES / directory).glob("*.yaml"))
    ]
    assert len(recipes) >= 10
    for path in recipes:
        text = path.read_text()
        assert script.HEADER_MARKER in text.splitlines(), path
        assert script.with_memory_header(text, script.memory_header(*script.recipe_setup(path))) == text, path

"""Faster rollouts that must not change what is sampled: the compiled static-cache decode and LoRA folded into the
base weights while sampling."""

import pytest
import torch
from conftest import TRAINING_PROMPTS, load_script, make_config, make_trainer, perturb_adapters
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from trl_t2i import T2IGRPOTrainer
from trl_t2i.decoding import resolve_compile, sample_image_tokens, static_decoder
from trl_t2i.merged_adapters import folded_bytes, merged_adapters, why_not_mergeable
from trl_t2i.models import TINY_JANUS, TINY_LLAMAGEN, base, get_family
from trl_t2i.models.llamagen import LlamaGenFamily
from trl_t2i.rewards import colour_match
from trl_t2i.sampling import SamplingConfig


WARPS = [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)]


def _sample(family, model, conditioning, sampling, **kwargs):
    torch.manual_seed(11)
    return sample_image_tokens(family, model, conditioning, sampling, return_conditional_logps=True, **kwargs)


def _addresses(decoder) -> set[int]:
    """Where the tensors a compiled step reads live: every shape's KV cache, mask and decode buffers."""
    tensors = []
    for state, buffers in decoder.shapes.values():
        tensors += [tensor for layer in state.cache.layers for tensor in (layer.keys, layer.values)]
        tensors += [state.attention_mask, *(layer.cumulative_length for layer in state.cache.layers)]
        tensors += [buffers.logits, buffers.noise, buffers.position, *buffers.outputs.values()]
    return {tensor.data_ptr() for tensor in tensors}


def _assert_same_sample(compiled, eager):
    assert torch.equal(compiled.image_tokens, eager.image_tokens)
    torch.testing.assert_close(compiled.logps, eager.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled.conditional_logps, eager.conditional_logps, atol=1e-5, rtol=0)


def test_the_compiled_decode_samples_like_the_eager_one_and_reuses_its_graph_and_buffers(
    tiny_family, prompts, monkeypatch
):
    model, _, family, _ = tiny_family
    # Early positions attend over part of the static cache, rounded up to a multiple of 16 here (of 128 by default),
    # the last ones over all of it (a cache rounded up to a multiple of 16, not 64)
    monkeypatch.setattr(base, "ATTENDED_LENGTH_MULTIPLE", 16)
    monkeypatch.setattr(base, "STATIC_LENGTH_MULTIPLE", 16)
    decoder, sampling = static_decoder(family), WARPS[1]  # guidance, temperature, top-k and top-p
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def same_as_eager(texts):
        conditioning = family.encode_prompts(texts)
        _assert_same_sample(*(_sample(family, model, conditioning, sampling, compile=flag) for flag in (True, False)))

    same_as_eager(prompts)  # prompts of different lengths: left padding in the cache
    attended = sorted(length for _, length in decoder.calls)
    ((state, _),) = decoder.shapes.values()
    assert attended[0] < attended[-1] == state.cache.max_length and all(n % 16 == 0 for n in attended)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled == graphs + 1  # one graph for every attended length, the whole cache's included
    addresses = _addresses(decoder)

    # Prompts of other lengths, then a last partial batch (padded to the compiled 4 rows): the same graphs, the same
    # tensors, and for the real rows the tokens and log-probs of an eager decode of just them.
    same_as_eager(["a cat"] * len(prompts))
    same_as_eager(prompts[:3])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    assert _addresses(decoder) == addresses and len(decoder.shapes) == 1


@pytest.mark.parametrize("cache_length, lengths", [(640, 5), (384, 3), (1152, 5)])  # Janus, LlamaGen 256/512 px
def test_a_static_decode_attends_over_few_lengths_each_covering_the_positions_fed(cache_length, lengths):
    attended = [base.attended_length(needed, cache_length) for needed in range(1, cache_length + 1)]
    assert all(needed <= length <= cache_length for needed, length in enumerate(attended, 1))
    assert len(set(attended)) == lengths <= base.MAX_ATTENDED_LENGTHS  # a CUDA graph each


def test_auto_compiles_on_cuda_unless_each_rollout_gathers_the_weights(tiny_janus):
    _, _, family = tiny_janus
    assert resolve_compile("auto", family, "cuda") and not resolve_compile("auto", family, "cpu")
    assert not resolve_compile("auto", family, "cuda", gathered_weights=True)  # ZeRO-3, FSDP: weights move
    assert resolve_compile(True, family, "cuda", gathered_weights=True) and resolve_compile("true", family, "cpu")
    assert not resolve_compile("false", family, "cuda")
    with pytest.raises(ValueError, match="Unknown compile setting 'yes'. Valid choices: auto, true, false"):
        resolve_compile("yes", family, "cuda")


def test_a_family_without_a_static_decode_refuses_to_compile(tiny_janus, prompts):
    model, _, family = tiny_janus
    family.supports_static_decoding = False
    with pytest.raises(ValueError, match="JanusFamily has no static decode"):
        sample_image_tokens(family, model, family.encode_prompts(prompts), compile=True)


def test_the_trainer_refuses_to_compile_a_family_without_a_static_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(LlamaGenFamily, "supports_static_decoding", False)
    with pytest.raises(ValueError, match="`compile_rollouts=true` needs a static decode.*'llamagen'"):
        make_trainer(tmp_path, model=TINY_LLAMAGEN, compile_rollouts=True)


def _lora_janus(tiny_janus, **lora_settings):
    model, _, family = tiny_janus
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=family.lora_target_modules, **lora_settings))
    perturb_adapters(peft_model, std=0.3)
    return peft_model, family


def test_folded_adapters_sample_like_the_unfolded_ones_and_leave_the_weights_bit_for_bit(tiny_janus, prompts):
    peft_model, family = _lora_janus(tiny_janus)
    conditioning = family.encode_prompts(prompts)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    unfolded_samples = []
    for sampling in WARPS:
        unfolded = _sample(family, peft_model, conditioning, sampling)
        unfolded_samples.append(unfolded)
        with merged_adapters(peft_model):
            folded = _sample(family, peft_model, conditioning, sampling)
        assert torch.equal(folded.image_tokens, unfolded.image_tokens)
        torch.testing.assert_close(folded.logps, unfolded.logps, atol=1e-5, rtol=0)

    for name, param in peft_model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.requires_grad == (name in trainable), name
    assert torch.equal(_sample(family, peft_model, conditioning, WARPS[0]).logps, unfolded_samples[0].logps)


def test_folded_adapters_are_undone_when_sampling_fails(tiny_janus):
    peft_model, _ = _lora_janus(tiny_janus)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    with pytest.raises(RuntimeError, match="interrupted"), merged_adapters(peft_model):
        raise RuntimeError("interrupted")
    assert all(torch.equal(param, before[name]) for name, param in peft_model.named_parameters())
    assert why_not_mergeable(peft_model) is None  # adapters enabled again


def test_adapters_that_cannot_be_folded_say_why(tiny_janus, tmp_path):
    model, _, _ = tiny_janus
    assert why_not_mergeable(model) == "the model has no LoRA layers"
    dora, _ = _lora_janus(tiny_janus, use_dora=True)
    assert "DoRA" in why_not_mergeable(dora)
    with pytest.raises(ValueError, match="Cannot fold the adapters.*DoRA"), merged_adapters(dora):
        pass


def _qlora_janus():
    """The tiny Janus loaded in 4-bit with LoRA adapters on its language model, in evaluation mode (as the trainer
    samples), bitsandbytes' CPU weight repack off (as the trainer leaves it)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from trl_t2i.models import disable_bnb_cpu_repack, load_model, load_processor

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    quantized = load_model(TINY_JANUS, quantization_config=config, dtype=torch.float32)
    disable_bnb_cpu_repack(quantized)
    family = get_family(quantized, load_processor(TINY_JANUS))
    peft_model = get_peft_model(quantized, LoraConfig(r=4, target_modules=family.lora_target_modules))
    return peft_model.eval(), family


def test_qlora_adapters_cannot_be_folded():
    peft_model, _ = _qlora_janus()
    assert "peft.tuners.lora.bnb.Linear4bit" in why_not_mergeable(peft_model)


def test_qlora_rollouts_compile_to_one_graph_and_sample_like_the_eager_decode(prompts):
    # The headline recipe's rollout on a GPU (QLoRA: the adapters cannot be folded; compiled by default): the
    # 4-bit matmuls and PEFT's adapter branch must trace into the one decode graph, without graph breaks
    peft_model, family = _qlora_janus()
    perturb_adapters(peft_model, std=0.3)
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    conditioning = family.encode_prompts(prompts)
    _assert_same_sample(*(_sample(family, peft_model, conditioning, WARPS[1], compile=flag) for flag in (True, False)))
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert sum(counters["graph_break"].values()) == breaks


@pytest.mark.parametrize(
    ("model", "merge", "compile"),
    [(TINY_JANUS, True, False), (TINY_JANUS, False, False), (TINY_LLAMAGEN, True, True)],  # Janus compiled: below
)
def test_the_trainer_samples_with_folded_adapters_and_on_policy_logps(tmp_path, model, merge, compile):
    trainer = make_trainer(tmp_path, model=model, merge_adapters_for_rollouts=merge, compile_rollouts=compile)
    perturb_adapters(trainer.model, std=0.3)
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    adapter_calls, calls_while_sampling = [], []
    lora_a = next(module for name, module in trainer.model.named_modules() if name.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda *args: adapter_calls.append(1))
    generate = trainer._generate

    def counting_generate(prompts):
        start = len(adapter_calls)
        rollout = generate(prompts)
        calls_while_sampling.append(len(adapter_calls) - start)
        return rollout

    trainer._generate = counting_generate
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in TRAINING_PROMPTS[:2] for _ in range(4)])
    assert (calls_while_sampling[0] == 0) == merge  # folded: the adapter matmuls never run while sampling
    assert all(torch.equal(param, before[name]) for name, param in trainer.model.named_parameters())

    with torch.no_grad():
        table = trainer._teacher_forced_logits(
            trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"]
        ).log_softmax(-1)
    scored = table.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    # 5e-5: the compiled LlamaGen decode pads captions to `caption_length`, which T5 rounds a little differently.
    torch.testing.assert_close(scored, batch["sampling_per_token_logps"], atol=5e-5, rtol=0)


def test_the_sample_command_compiles_on_request_and_writes_the_same_images(tmp_path):
    from trl_t2i.cli import sample

    written = {}
    for compiled in ("false", "true"):
        argv = ["--prompts", "a red cat", "a blue car", "--num_images_per_prompt", "2", "--compile", compiled]
        (args,) = sample.make_parser().parse_args_and_config([*argv, "--output_dir", str(tmp_path / compiled)])
        sample.main(args)
        written[compiled] = {path.name: path.read_bytes() for path in (tmp_path / compiled).iterdir()}
    assert written["true"] == written["false"] and len(written["true"]) == 5


def test_folding_allocates_one_copy_of_the_adapted_weights_as_the_memory_model_says(tiny_janus):
    from trl_t2i.memory import Architecture

    LiveTensorBytes = load_script("memory_model").LiveTensorBytes

    peft_model, _ = _lora_janus(tiny_janus)
    weights = [layer.get_base_layer().weight for layer in peft_model.modules() if hasattr(layer, "lora_A")]
    assert folded_bytes(peft_model) == sum(weight.nbytes for weight in weights)
    architecture = Architecture.from_janus_config(peft_model.config)
    assert folded_bytes(peft_model) == architecture.lm_linear_params * 4  # every LM linear, fp32
    with LiveTensorBytes() as live, merged_adapters(peft_model):
        inside = live.current
    largest = max(weight.nbytes for weight in weights)
    assert folded_bytes(peft_model) <= inside and live.peak <= folded_bytes(peft_model) + 3 * largest


def test_folding_is_skipped_when_the_copy_does_not_fit_on_the_gpu(monkeypatch):
    from trl_t2i import trainer

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**30)
    device = torch.device("cuda", 0)
    assert trainer._fold_does_not_fit(2 * 2**30, device) is None  # 4 GiB free: 2 + 1 to spare fits
    assert trainer._fold_does_not_fit(3.5 * 2**30, device) == (
        "the folded weights need 3.5 GiB and the GPU has 4.0 GiB free"
    )


def test_folding_in_bf16_gives_the_weights_back_where_peft_unmerge_drifts(tiny_janus):
    peft_model, _ = _lora_janus(tiny_janus)
    peft_model.to(torch.bfloat16)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    for _ in range(3):
        with merged_adapters(peft_model):
            pass
    assert all(torch.equal(param, before[name]) for name, param in peft_model.named_parameters())
    for _ in range(3):  # what this replaces: PEFT's fold and unfold by subtraction
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    assert not all(torch.equal(param, before[name]) for name, param in peft_model.named_parameters())


def test_a_compiled_run_compiles_its_decode_step_once_and_keeps_its_tensors(tmp_path):
    # Rollouts of 8 images (2 micro-batches of 4, accumulated), evaluation batches of 4 (padded to 8), LoRA folded,
    # then a resume from the step-2 checkpoint (the adapters loaded from disk into the same trainer).
    args = make_config(
        tmp_path,
        compile_rollouts="true",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
    )
    trainer = T2IGRPOTrainer(
        model=TINY_JANUS,
        reward_funcs=colour_match,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": TRAINING_PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": TRAINING_PROMPTS[:2]}),
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )
    folded_weight = next(module for module in trainer.model.modules() if hasattr(module, "lora_A"))
    folded_weight = folded_weight.get_base_layer().weight
    addresses, sizes, generate = [], [], trainer._generate

    def recording_generate(prompts):
        rollout = generate(prompts)
        addresses.append((_addresses(static_decoder(trainer.family)), folded_weight.data_ptr()))
        sizes.append(len(prompts))
        return rollout

    trainer._generate = recording_generate
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer.train()
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert sizes.count(8) == 4 and 4 in sizes  # every training rollout, and evaluation ones of another size
    assert all(entry == addresses[0] for entry in addresses)
    compile_times = [entry["time/compile"] for entry in trainer.state.log_history if "time/compile" in entry]
    assert len(compile_times) == 1 and compile_times[0] > 0
    # on-policy: the compiled sampler's log-probs are teacher forcing's, every step and evaluation
    gaps = [(key, entry[key]) for entry in trainer.state.log_history for key in entry if key.endswith("logp_gap_max")]
    assert {key for key, _ in gaps} == {"sampling/logp_gap_max", "eval_sampling/logp_gap_max"}
    assert max(gap for _, gap in gaps) < 1e-5

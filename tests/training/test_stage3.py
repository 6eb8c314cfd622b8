"""Stage 3 (LoRA SFT): what trains and what does not, where the loss falls, accumulation, resume, tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.config import GrokConfig, ProjectorConfig
from grok_pacs.model.grok import GrokModel, ensure_image_token
from grok_pacs.model.precision import cpu_has_amx_bf16
from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import IGNORE_INDEX, human_turn
from grok_pacs.model.vit import build_encoder
from training.stage3.checkpoint import CheckpointMismatch
from training.stage3.config import Stage3Config, StandInLLMConfig
from training.stage3.data import SFTDataset, build_samples, chat_text, collate, target_token_count
from training.stage3.features import FeatureStore, encode_images
from training.stage3.lora import LoraSetupError, attach_lora, check_lora_trainable, load_base_llm, merged_copy
from training.stage3.pretrain_llm import pretrain_stand_in
from training.stage3.train import SFTTrainer, select_precision
from training.tokenizer import IM_END, IM_START, IMAGE_TOKEN, load_tokenizer, save_tokenizer, train_bpe

torch.set_num_threads(1)

STAND_IN = StandInLLMConfig(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    epochs=1,
    batch_size=8,
    max_length=256,
)
CFG = Stage3Config.small(
    stand_in=STAND_IN,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    epochs=2,
    batch_size=4,
    lr=5e-3,
    projector_lr=5e-3,
    warmup_ratio=0.1,
)


def _records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        label = DIAGNOSTIC_LABELS[i % 3].value
        reply = f"The optic disc and macula show the pattern of {label.lower()} in this eye."
        records.append(
            {
                "id": f"P{i:03d}_R",
                "label": label,
                "image": "cfp.png",
                "octs": "oct.dcm",
                "conversations": [{"from": "human", "value": human_turn()}, {"from": "gpt", "value": reply}],
            }
        )
    return records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tokenizer, stand-in LLM directory, real tiny encoders and their cached features for 12 eyes."""
    root = tmp_path_factory.mktemp("stage3")
    records = _records(12)
    texts = [r["conversations"][1]["value"] for r in records] + [human_turn()]
    save_tokenizer(train_bpe(texts * 3, vocab_size=300, min_frequency=1), root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer")
    pretrain_stand_in([chat_text(r) for r in records], tokenizer, STAND_IN, root / "llm", progress=False)
    grok = GrokConfig.tiny()
    cfp_encoder, oct_encoder = build_encoder(grok.cfp_encoder), build_encoder(grok.oct_encoder)
    images = torch.randn(len(records), 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cfp, cfp_pooled = encode_images(cfp_encoder, images, 6, torch.device("cpu"), "cfp", False)
    oct_, oct_pooled = encode_images(oct_encoder, images.flip(-1), 6, torch.device("cpu"), "oct", False)
    store = FeatureStore([r["id"] for r in records], cfp, oct_, cfp_pooled, oct_pooled)
    return {
        "root": root,
        "records": records,
        "tokenizer": tokenizer,
        "store": store,
        "grok": grok,
        "encoders": (cfp_encoder, oct_encoder),
        "images": images,
    }


def _model(tiny: dict, cfg: Stage3Config = CFG, seed: int = 0) -> GrokModel:
    torch.manual_seed(seed)
    llm = load_base_llm(tiny["root"] / "llm")
    image_id = ensure_image_token(tiny["tokenizer"], llm)
    projectors = Projectors(
        ProjectorConfig(vision_dim=tiny["grok"].projector.vision_dim, llm_hidden_size=STAND_IN.hidden_size)
    )
    return GrokModel(attach_lora(llm, cfg), projectors, image_id)


def _trainer(tiny: dict, run_dir: Path, cfg: Stage3Config = CFG, seed: int = 0) -> SFTTrainer:
    samples = build_samples(tiny["records"], tiny["tokenizer"], tiny["store"], max_length=cfg.max_length)
    return SFTTrainer(
        _model(tiny, cfg, seed),
        cfg,
        SFTDataset(samples[:8], tiny["store"]),
        SFTDataset(samples[8:], tiny["store"]),
        run_dir,
        tiny["tokenizer"].pad_token_id,
        progress=False,
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lora_and_projectors_change_encoders_and_base_do_not(tiny: dict, tmp_path: Path) -> None:
    trainer = _trainer(tiny, tmp_path)
    model = trainer.model
    encoders_before = [_snapshot(e) for e in tiny["encoders"]]
    lora_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    proj_before = _snapshot(model.projectors)
    assert lora_before and all("lora_A" in n or "lora_B" in n for n in lora_before)
    trainer.fit(max_steps=3)
    lora_after = dict(model.llm.named_parameters())
    changed = [n for n, v in lora_before.items() if not torch.equal(v, lora_after[n])]
    assert len(changed) == len(lora_before), f"LoRA tensors that did not train: {set(lora_before) - set(changed)}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{name}.lora_B" in n for n in changed), name
    proj_after = model.projectors.state_dict()
    assert all(not torch.equal(v, proj_after[k]) for k, v in proj_before.items() if "missing" not in k)
    for name, value in base_before.items():
        assert torch.equal(value, lora_after[name]), f"base LLM weight {name} changed"
    for before, encoder in zip(encoders_before, tiny["encoders"]):
        assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
        assert not any(p.requires_grad for p in encoder.parameters())


def test_frozen_lora_is_refused(tiny: dict) -> None:
    """The paper's code froze its adapters after attaching them; ours refuses to train like that."""
    model = _model(tiny)
    for name, param in model.llm.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
    with pytest.raises(LoraSetupError, match="would not train"):
        check_lora_trainable(model.llm, CFG.lora_targets)


def test_loss_falls_on_assistant_tokens_only(tiny: dict) -> None:
    tokenizer = tiny["tokenizer"]
    samples = build_samples(tiny["records"][:2], tokenizer, tiny["store"], max_length=CFG.max_length)
    header = tokenizer(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"]
    reply_text = tiny["records"][0]["conversations"][1]["value"]
    for sample in samples:
        ids = sample.input_ids
        start = next(i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header)
        assert sample.labels[:start] == [IGNORE_INDEX] * start
        assert sample.labels[start:] == ids[start:]
        decoded = tokenizer.decode(ids[start:])
        assert decoded.endswith(IM_END) and "\nDiagnosis: " in decoded and IMAGE_TOKEN not in decoded
    assert reply_text.split()[0] in tokenizer.decode(samples[0].input_ids[start:])
    model = _model(tiny).eval()
    batch = collate(SFTDataset(samples, tiny["store"]), tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            cfp_tokens=batch["cfp_tokens"],
            oct_tokens=batch["oct_tokens"],
        ).loss
        spliced = model.splice(
            batch["input_ids"], batch["attention_mask"], None, batch["cfp_tokens"], batch["oct_tokens"]
        )
        logits = model.llm(**spliced).logits
    # Expected: the visual embeddings (392) replace the one image token, so each assistant token sits 391
    # places later in the spliced sequence; cross-entropy over those positions only.
    terms = []
    for row, sample in enumerate(samples):
        start = next(
            i + len(header) for i in range(len(sample.input_ids)) if sample.input_ids[i : i + len(header)] == header
        )
        for pos in range(start, len(sample.input_ids)):
            where = pos + 391
            terms.append(torch.nn.functional.cross_entropy(logits[row, where - 1], torch.tensor(sample.input_ids[pos])))
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tiny: dict, tmp_path: Path) -> None:
    big = _trainer(tiny, tmp_path / "big", replace(CFG, batch_size=4, grad_accum=1))
    small = _trainer(tiny, tmp_path / "small", replace(CFG, batch_size=2, grad_accum=2))
    big.fit(max_steps=1)
    small.fit(max_steps=1)
    a, b = dict(big.model.named_parameters()), dict(small.model.named_parameters())
    trained = [n for n, p in a.items() if p.requires_grad]
    assert trained
    for name in trained:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_resume_continues_as_if_never_interrupted(tiny: dict, tmp_path: Path) -> None:
    straight = _trainer(tiny, tmp_path / "straight")
    result = straight.fit()
    interrupted = _trainer(tiny, tmp_path / "resumed")
    interrupted.fit(max_steps=3)
    resumed = _trainer(tiny, tmp_path / "resumed", seed=123)  # fresh weights: all must come from the checkpoint
    again = resumed.fit()
    assert again.steps == result.steps == 4
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name, param in a.items():
        if param.requires_grad:
            assert torch.allclose(param, b[name], atol=1e-6), name
    assert [s for s, _ in again.train_losses] == [1, 2, 3, 4]
    assert result.curve_png.is_file() and result.curve_png.stat().st_size > 1000
    history = json.loads((tmp_path / "straight" / "loss_history.json").read_text())
    assert len(history["train"]) == 4 and len(history["val"]) == 3  # before training + each epoch end
    other = _trainer(tiny, tmp_path / "resumed", replace(CFG, lr=1e-3))
    with pytest.raises(CheckpointMismatch, match="config"):
        other.fit()


def test_checkpoint_carries_its_full_config_and_a_changed_field_is_refused_by_name(tiny: dict, tmp_path: Path) -> None:
    _trainer(tiny, tmp_path).fit(max_steps=1)
    saved = json.loads((tmp_path / "checkpoints" / "latest" / "config.json").read_text())
    assert Stage3Config.from_dict(saved) == CFG  # the whole configuration, not a digest
    changed = replace(CFG, lora_dropout=0.1, stand_in=replace(STAND_IN, epochs=2), checkpoint_every=5)
    with pytest.raises(CheckpointMismatch, match=r"\['lora_dropout', 'stand_in'\]"):
        _trainer(tiny, tmp_path, changed).fit()
    _trainer(tiny, tmp_path, replace(CFG, checkpoint_every=5)).fit(max_steps=2)  # bookkeeping may change


def test_merged_lora_generates_like_the_adapter(tiny: dict, tmp_path: Path) -> None:
    trainer = _trainer(tiny, tmp_path)
    trainer.fit(max_steps=2)
    model = trainer.model.eval()
    batch = collate(
        SFTDataset(
            build_samples(tiny["records"][:1], tiny["tokenizer"], tiny["store"], max_length=CFG.max_length),
            tiny["store"],
        ),
        0,
    )
    spliced = model.splice(batch["input_ids"], None, None, batch["cfp_tokens"], batch["oct_tokens"])
    with torch.no_grad():
        expected = model.llm(**spliced).logits
        merged = merged_copy(model.llm)(**spliced).logits
    assert torch.allclose(expected, merged, atol=1e-4)


def test_precision_is_fp32_on_cpu_and_bf16_only_where_the_cpu_has_amx() -> None:
    if torch.cuda.is_available():
        pytest.fail("this test describes the CPU machine CI runs on")
    cpu = torch.device("cpu")
    assert select_precision(CFG) == (cpu, None)  # "auto" never autocasts on a CPU
    bf16 = replace(CFG, precision="bf16")
    assert select_precision(bf16, amx=True) == (cpu, torch.bfloat16)
    with pytest.raises(RuntimeError, match="AMX"):
        select_precision(bf16, amx=False)
    # the SmolLM2 preset asks for bf16 exactly where this CPU has AMX tiles
    assert Stage3Config.smollm().precision == ("bf16" if cpu_has_amx_bf16() else "fp32")


def test_the_smollm_preset_names_the_amd_subtype_in_its_pattern_line() -> None:
    cfg = Stage3Config.smollm()
    assert cfg.pattern_head and cfg.pattern_subtype
    assert not Stage3Config.smollm(biomarker_estimates=False).pattern_subtype  # no estimates, no line
    with pytest.raises(ValueError, match="pattern_subtype needs pattern_head"):
        Stage3Config.smollm(pattern_head=False, pattern_subtype=True)


def test_phantom_tokenizer_keeps_chatml_and_image_tokens_whole(tmp_path: Path) -> None:
    texts = ["Cup-to-disc ratio 0.72 with thinning of the RNFL. Diagnosis: Glaucoma"] * 20
    save_tokenizer(train_bpe(texts, vocab_size=280), tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_TOKEN}\nHello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith(f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for special in (IM_START, IM_END, IMAGE_TOKEN):
        assert tokenizer.convert_tokens_to_ids(special) in ids
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    assert tokenizer.decode(ids) == prompt
    text = "Unseen wørds: ΔRNFL −3 µm"  # byte-level: nothing is unknown
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_estimate_targets_cite_the_heads_estimates_not_the_measurements() -> None:
    """With estimates in the prompt, the training report must cite those estimates (what the SR carries)."""
    from grok_pacs.domain.biomarkers import BIOMARKERS, to_prompt_json
    from training.benchmark.grounding import check_grounding
    from training.stage1.teachers.guideline import GuidelineTeacher
    from training.stage3.targets import TeacherEye, estimate_grounded

    truth = {b.key: (b.normal[0] + b.normal[1]) / 2 for b in BIOMARKERS}
    truth["cup_to_disc"] = 0.78
    estimates = {k: v * 1.07 for k, v in truth.items()}
    report = GuidelineTeacher().write(TeacherEye("S1", "R", DIAGNOSTIC_LABELS[1], truth))
    record = {
        "id": "S1_R",
        "subject_id": "S1",
        "eye": "R",
        "label": "Glaucoma",
        "teacher": "guideline",
        "biomarkers": json.loads(to_prompt_json(truth)),
        "conversations": [{"from": "human", "value": human_turn()}, {"from": "gpt", "value": report}],
    }
    assert check_grounding(report, truth).agreement == 1.0
    assert check_grounding(report, estimates).agreement == 0.0
    for teacher in ("guideline", "o3"):
        (grounded,) = estimate_grounded([{**record, "teacher": teacher}], {"S1_R": estimates})
        text = grounded["conversations"][1]["value"]
        result = check_grounding(text, estimates)
        assert result.n_cited >= 3 and result.agreement == 1.0, (teacher, result.mismatches)
        assert "glaucoma" in text.lower() and record["conversations"][1]["value"] == report


def test_a_qwen2_style_tokenizer_directory_gets_the_image_token(tmp_path: Path) -> None:
    """A real Qwen2 tokenizer has the ChatML tokens but no <image>: loading adds it as one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["Retinal images of both eyes. Diagnosis: Normal"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", IM_START, IM_END],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(tokenizer) - 1
    assert tokenizer(f"x{IMAGE_TOKEN}y", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert tokenizer.chat_template  # ChatML template set when the directory has none
    with pytest.raises(Exception, match="tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_decision_tokens_weigh_more_only_when_asked() -> None:
    from training.stage3.train import token_weights

    ignore = IGNORE_INDEX
    targets = torch.tensor(
        [[ignore, ignore, 5, 6, 7, 8, 9, 10, ignore], [ignore, 5, 6, 7, ignore, ignore, ignore, ignore, ignore]]
    )
    plain = token_weights(targets, 1.0, (2, 1))
    assert plain.tolist() == (targets != ignore).float().tolist()
    weighted = token_weights(targets, 3.0, (2, 1))
    assert weighted[0].tolist() == [0, 0, 3, 3, 1, 1, 1, 3, 0]
    assert weighted[1].tolist() == [0, 3, 3, 3, 0, 0, 0, 0, 0]


def test_the_trainer_projects_only_reply_positions_onto_the_vocabulary(tiny: dict, tmp_path: Path) -> None:
    """The training loss is the model's own mean over reply tokens, while the vocabulary projection (the
    lm_head and its backward) sees only the positions that predict a reply token."""
    trainer = _trainer(tiny, tmp_path)
    samples = build_samples(tiny["records"][:2], tiny["tokenizer"], tiny["store"], max_length=CFG.max_length)
    batch = collate(SFTDataset(samples, tiny["store"]), tiny["tokenizer"].pad_token_id)
    projected: list[int] = []
    hook = trainer.model.llm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[1])
    )
    with torch.no_grad():
        ours = trainer._loss_sum(batch, target_token_count(batch))
        hook.remove()
        reference = trainer.model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
            cfp_tokens=batch["cfp_tokens"],
            oct_tokens=batch["oct_tokens"],
        ).loss
    assert torch.allclose(ours, reference, atol=1e-5)
    spliced_length = batch["input_ids"].shape[1] + 391  # the image token becomes 392 visual positions
    longest_reply = max(sum(label != IGNORE_INDEX for label in s.labels) for s in samples)
    assert len(projected) == 1 and longest_reply <= projected[0] < spliced_length / 2

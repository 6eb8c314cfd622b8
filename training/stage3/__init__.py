"""Stage 3: LoRA supervised fine-tuning of the multimodal Qwen2 (docs/domain.md, The GROK model), and its stand-in
pretraining.

`config` (presets `small` and `paper`), `features` (frozen encoder tokens, cached), `pretrain_llm` (the
phantom's tiny Qwen2 base, a documented stand-in), `data` (records -> ChatML batches), `train` (the SFT
loop), `run` (the whole stage end to end), `result` (its inputs, its output folder and
reading a finished run back), `decide` (the heads' served estimates and the decision classifier the
prompts carry), `bundle` (the GrokConfig and packing a finished run into the servable bundle),
`calibrate` (the bundle's engine on a validation split, its scores handed to `training.calibration`),
`crossfit` (cross-fitted estimates of the training eyes and the decision classifier fitted on them).
Run it with `python -m training.stage3 --help`.
"""

"""The GROK model definition shared by training (stages 2, 3), export and the runtime: sizes and
generation settings (`config`), the ViT encoders (`vit`) and their checkpoints (`checkpoints`), projectors
(`projector`), biomarker heads (`heads`), the pattern head naming the label the estimates resemble
(`pattern`), the decision classifier that decides each eye's label with a calibrated probability
(`decision`), the multimodal Qwen2 (`grok`), the prompt format (`prompt`) and the LLM's float type, bf16
or fp32, for training and runtime (`precision`).

May import: `grok_pacs.config`, `grok_pacs.domain`.
"""

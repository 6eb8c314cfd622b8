"""Stage-1 teachers: write a report paragraph for one eye from its biomarkers, label and the Eye-Guideline.

`guideline.GuidelineTeacher` is deterministic and offline; `openai_compat.ChatTeacher` asks an
OpenAI-compatible chat-completions server (o3, vLLM, llama.cpp) with the stage-1 prompt
(docs/domain.md, The GROK model) and the images.
"""

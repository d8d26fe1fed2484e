"""The OpenAI-compatible fine-tuning surface: `/v1/fine_tuning/jobs` over the native jobs.

An OpenAI job id is the native job id; the mapping between the two shapes is one pure
module (`mapping.py`, documented in docs/openai.md)."""

"""Users' data files: validated once after upload (`validate`), tokenized (`tokenizers`) and
loaded into the engine's sample sets (`load`).

`validate` imports numpy only, so the validation task never loads torch; import the
modules directly rather than through this package.
"""

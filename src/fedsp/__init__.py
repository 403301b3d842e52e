"""fedsp: federated fine-tuning of a private LLM with soft prompts as messengers (FedSP)."""

__version__ = "0.1.0"

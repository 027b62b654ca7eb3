"""`harc serve` and `harc redteam`: an OpenAI-compatible server for a model, its adapters and policy
layers, and garak red-teaming against it (optional extras `harc[serve]` and `harc[redteam]`)."""

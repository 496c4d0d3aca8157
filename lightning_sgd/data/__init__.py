"""Dataset generators and file-format readers (pure: no Lightning). DataModules live in lightning_sgd.recipes."""

"""Paired training data: manifest and readers, §2.5 normalisation, §2.8 masks, §2.7
augmentation and patch sampling, §2.4 folds. See docs/data.md."""

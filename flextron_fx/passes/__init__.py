"""Graph passes: rank (importance), permute (sort by importance), elasticize (slicing ops)."""

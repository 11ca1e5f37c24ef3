"""Elastic runtime: the model type users hold, and the ops the elasticize pass inserts."""

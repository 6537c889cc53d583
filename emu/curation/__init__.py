"""The curation funnel: the automatic filters and the human stages."""

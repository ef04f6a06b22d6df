"""The AudioRoom API: models, field types and the CRD generated from them."""

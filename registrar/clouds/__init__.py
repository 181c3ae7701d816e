"""Cloud backends: one module per cloud, the only modules that import that cloud's libraries."""

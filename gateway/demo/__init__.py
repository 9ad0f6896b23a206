"""Demo and test servers: a rotating identity provider and an echo upstream."""

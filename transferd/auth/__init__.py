"""Authentication and authorization: X.509 client certificates, bearer tokens, access rules."""

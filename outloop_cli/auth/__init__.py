"""Credentials that are not a static value: OAuth2, AWS SigV4, Google service accounts, minted by the broker."""

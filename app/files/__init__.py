"""Uploaded files (`/v1/files`), as the OpenAI API and its SDKs' `client.files` know them."""

"""Protocol buffers of the client API and the chunk-transfer service, and the code generated from them."""

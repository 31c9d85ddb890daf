/**
 * A UUID in its textual form, any case (the fleet stores and compares them lower-cased). Both cases are spelled out
 * rather than given by the `i` flag, so that it means the same as a JSON Schema `pattern` (/openapi.json).
 */
export const UUID_PATTERN = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** The smallest UUID: a keyset page over UUID keys starts after it. */
export const NIL_UUID = '00000000-0000-0000-0000-000000000000';

/** A UUID in its textual form, any case (the fleet stores and compares them lower-cased). */
export const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** The smallest UUID: a keyset page over UUID keys starts after it. */
export const NIL_UUID = '00000000-0000-0000-0000-000000000000';

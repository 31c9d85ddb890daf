/** BullMQ queue names (docs/contract.md): producers in any language address these with the configured prefix. */
export const LIFECYCLE_QUEUE = 'lifecycle';
export const MAINTENANCE_QUEUE = 'maintenance';

/**
 * The TypeORM data source, where TypeORM's tooling looks for it. The definition lives with the rest of the
 * persistence layer, in src/entities/schema/data-source.ts.
 */
export { createDataSource, GuardedClient, type DataSourceSettings } from './src/entities/schema/data-source';

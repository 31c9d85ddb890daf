/** The tests' Redis Cluster: dev/redis-cluster.ts (chaos and the benches use it too). */
export { OwnRedisCluster, type FailoverRecord, type RedisClusterOptions } from '../../dev/redis-cluster';

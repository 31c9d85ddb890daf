export { ProbeLanes, probeReady, readinessUrl, type ProbeOutcome } from './probe';
export {
  addTotals,
  cutShards,
  idleReport,
  loadShard,
  probeShard,
  runShard,
  type ProbeTotals,
  type ShardJobData,
  type ShardReport,
  type ShardRunnerOptions,
} from './shards';

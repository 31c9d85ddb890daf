/**
 * The process's view of a server (`ServerWatch`): one line when it goes away, one when it is back, and nothing for
 * the fleet's own retryable answers, which come from a server that is there.
 */
import { expect } from 'chai';
import { isTransient, NotYetError } from '../../src/errors';
import { ServerWatch } from '../../src/redis/connection';

describe('ServerWatch', () => {
  it('reports a lost connection once and its return once', () => {
    const said: string[] = [];
    const watch = new ServerWatch('PostgreSQL at 127.0.0.1:5432', (_level, message) => said.push(message));
    const reset = Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' });
    expect(watch.error(reset)).to.equal(true);
    expect(watch.error(reset)).to.equal(true);
    watch.back();
    watch.back();
    expect(said).to.deep.equal(['lost PostgreSQL at 127.0.0.1:5432, retrying', 'PostgreSQL at 127.0.0.1:5432 is back']);
  });

  it('says nothing for a retryable answer of the fleet\'s own ("not yet": the deployment is not created yet)', () => {
    const said: string[] = [];
    const watch = new ServerWatch('PostgreSQL at 127.0.0.1:5432', (_level, message) => said.push(message));
    expect(watch.error(new NotYetError('deployment_not_found', '00000000-0000-4000-8000-000000000000'))).to.equal(false);
    expect(watch.isDown).to.equal(false);
    expect(said).to.deep.equal([]);
  });

  it('says nothing for a lock conflict PostgreSQL broke (a deadlock, a serialization failure): the server answered', () => {
    const said: string[] = [];
    const watch = new ServerWatch('PostgreSQL at 127.0.0.1:5432', (_level, message) => said.push(message));
    // as node-postgres raises them: the SQLSTATE in `code`
    const deadlock = Object.assign(new Error('deadlock detected'), { code: '40P01' });
    const serialization = Object.assign(new Error('could not serialize access due to concurrent update'), { code: '40001' });
    expect(isTransient(deadlock) && isTransient(serialization), 'still retryable').to.equal(true);
    expect([watch.error(deadlock), watch.error(serialization)]).to.deep.equal([false, false]);
    expect(watch.isDown).to.equal(false);
    expect(said).to.deep.equal([]);
  });
});
